"""Cross-entropy and token log-probabilities straight from hidden states and the LM head, chunk by chunk.

A causal LM's logits ``[B, T, V]`` are the biggest tensor of a fine-tuning step: SmolLM2's vocabulary of 49 152
makes them 400 MB in float32 for 8 x 256 tokens, kept for backward with a float copy and its gradient. These
functions take the final hidden states ``h`` ``[N, H]`` (only the scored tokens) and the head's weight ``W``
``[V, H]`` instead, and compute ``z = h W^T`` a chunk of rows at a time, so that no more than one chunk of logits
exists at once (the idea of Liger's FusedLinearCrossEntropy and of Cut Cross-Entropy, Wijmans et al. 2024):

- ``linear_cross_entropy``: sum over rows of ``(1-e) (lse(z) - z_y) + e (lse(z) - mean(z))`` (``e`` the label
  smoothing). Its gradients do not depend on anything after the loss but a scale, so they are computed in the
  forward pass, chunk by chunk (``dz = softmax(z) - (1-e) onehot(y) - e/V``), and only ``dh`` ``[N, H]`` and
  ``dW`` ``[V, H]`` are kept: one matmul fewer than recomputing them in backward.
- ``linear_token_logps``: ``log p(y) = z_y/t - lse(z/t)`` per row. What comes after it (DPO's sigmoid, GRPO's
  clipped ratio) weights each row's gradient, so backward recomputes each chunk's logits:
  ``dz = g (onehot(y) - softmax(z/t)) / t``.

The matmuls run in the dtype ``h`` and ``W`` come in (the kernel picks it: ``kernel.heads.matmul_dtype``);
softmax, log-sum-exp and the gradient of ``z`` in float32, as ``F.cross_entropy(logits.float())`` does.

Under tensor parallelism the head is split by vocabulary rows: ``W`` is a DTensor whose rank holds rows
``[o, o + V_r)`` (Megatron's vocabulary-parallel cross-entropy, chunked). Each rank computes its slice of every
chunk's logits and sends the rest of its group three numbers per row (its log-sum-exp, the target's logit when
the target is among its rows, its sum of logits), so the logits are never gathered: ``lse = logsumexp_r(lse_r)``.
Each rank keeps the gradient of its own rows of ``W``; the gradient of ``h`` is summed over the group once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MB in float32, whatever the vocabulary


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows of logits per chunk: ``elements`` logits, at least 16 rows (a matmul too thin is slow)."""
    return max(16, elements // max(vocab, 1))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         label_smoothing: float = 0.0, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding all the logits.

    hidden ``[N, H]``, weight ``[V, H]`` (or its vocabulary split, a DTensor), targets ``[N]`` (every row scored)
    -> a float32 scalar. Differentiable in ``hidden`` and ``weight``; equal to ``F.cross_entropy((hidden @
    weight.T).float(), targets, reduction="sum", label_smoothing=...)`` and its gradients."""
    check(hidden, weight, targets)
    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    split, weight = VocabSplit.of(weight)
    if split is not None:
        vocab_result: torch.Tensor = _SplitCrossEntropy.apply(  # type: ignore[no-untyped-call]
            hidden, split.local, targets, float(label_smoothing), chunk or split.chunk, differentiable, split)
        return vocab_result
    result: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, targets, float(label_smoothing),  # type: ignore[no-untyped-call]
                                                     chunk or chunk_rows(weight.shape[0]), differentiable)
    return result


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       chunk: int | None = None) -> torch.Tensor:
    """``log softmax(hidden @ weight.T / temperature)[row, target]`` per row, float32 ``[N]``; differentiable in
    ``hidden`` and ``weight``, with one chunk of logits alive at a time in forward and in backward."""
    check(hidden, weight, targets)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    split, weight = VocabSplit.of(weight)
    if split is not None:
        vocab_result: torch.Tensor = _SplitTokenLogps.apply(  # type: ignore[no-untyped-call]
            hidden, split.local, targets, float(temperature), chunk or split.chunk, split)
        return vocab_result
    result: torch.Tensor = _LinearTokenLogps.apply(hidden, weight, targets, float(temperature),  # type: ignore[no-untyped-call]
                                                   chunk or chunk_rows(weight.shape[0]))
    return result


def check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets [N] expected for hidden {tuple(hidden.shape)}, got {tuple(targets.shape)}")


def is_split(value: Any) -> TypeGuard[DTensor]:
    """Whether ``value`` is a DTensor (a tensor-parallel head's vocabulary split), which cannot cross as it is.
    Without importing ``torch.distributed.tensor``: where it was never imported no DTensor exists, and importing
    it costs a fresh plugin host half a second at its first loss."""
    if value is None or type(value) in (torch.Tensor, torch.nn.Parameter):
        return False
    loaded = sys.modules.get("torch.distributed.tensor")
    return loaded is not None and isinstance(value, loaded.DTensor)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` whole (``[..., V]``), differentiable; a vocabulary-split head's slices gathered."""
    if not is_split(weight):
        return hidden @ weight.T
    from torch.distributed.tensor import DTensor, Replicate

    spread = DTensor.from_local(hidden, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim,
                                run_check=False)
    sliced = spread @ weight.T  # [..., V] split by vocabulary
    assert isinstance(sliced, DTensor)
    logits: torch.Tensor = sliced.full_tensor()  # backward: each rank's slice, the hidden states' gradient summed
    return logits


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[c, V]`` float32 logits of one chunk of rows."""
    z = (h @ weight.T).float()
    return z if temperature == 1.0 else z.div_(temperature)


def cross_entropy_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, smoothing: float, gradient: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of rows: its summed cross-entropy, and (``gradient``) the gradient of its logits ``dz`` ``[c, V]``
    in the weight's dtype, computed in place of the float32 logits."""
    z = chunk_logits(h, weight)  # [c, V]
    lse = z.logsumexp(-1)  # [c]
    picked = z.gather(1, y.unsqueeze(1)).squeeze(1)  # [c]
    rows = lse - picked
    if smoothing:
        rows = (1 - smoothing) * rows + smoothing * (lse - z.mean(-1))
    if not gradient:
        return rows.sum(), None
    dz = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
    dz.scatter_add_(1, y.unsqueeze(1), torch.full_like(picked, -(1 - smoothing)).unsqueeze(1))
    if smoothing:
        dz.sub_(smoothing / weight.shape[0])
    return rows.sum(), dz.to(weight.dtype)


ChunkMaths = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool],
                      tuple[torch.Tensor, torch.Tensor | None]]
CHUNK_MATHS: dict[str, ChunkMaths] = {"cross_entropy": cross_entropy_chunk}  # compile_chunks swaps in compiled ones


def compile_chunks(options: dict[str, Any], say: Callable[[str], None]) -> None:
    """``torch.compile`` the per-chunk maths of ``linear_cross_entropy`` in this process (``[train] compile``):
    the logits' cast, log-sum-exp, softmax and its one-hot correction fused into fewer passes over each chunk.
    A compile that fails says why (``say``) and the chunk runs eagerly from then on."""
    compiled = torch.compile(cross_entropy_chunk, **options)
    failed: list[str] = []

    def guarded(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, smoothing: float, gradient: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not failed:
            try:
                return compiled(h, weight, y, smoothing, gradient)
            except Exception as exc:  # noqa: BLE001 -- a compiler failure: the eager maths give the same numbers
                root = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
                failed.append(f"{type(root).__name__}: {str(root).strip().splitlines()[0][:200] if str(root) else ''}")
                CHUNK_MATHS["cross_entropy"] = cross_entropy_chunk
                say(f"compile: the chunked loss runs eagerly from here ({failed[0]})")
        return cross_entropy_chunk(h, weight, y, smoothing, gradient)

    CHUNK_MATHS["cross_entropy"] = guarded


def eager_chunks() -> None:
    """The per-chunk maths back to eager (a run without ``compile`` after one with it, in one process)."""
    CHUNK_MATHS["cross_entropy"] = cross_entropy_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                smoothing: float, chunk: int, differentiable: bool) -> torch.Tensor:
        wants_h = differentiable and ctx.needs_input_grad[0]
        wants_w = differentiable and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if wants_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_w else None
        score = CHUNK_MATHS["cross_entropy"]
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            loss, dz = score(h, weight, y, smoothing, grad_h is not None or grad_w is not None)
            total += loss
            if dz is None:
                continue
            if grad_h is not None:
                grad_h[start:start + chunk] = dz @ weight
            if grad_w is not None:
                grad_w.addmm_(dz.T.float(), h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out.float()
        dh = None if grad_h is None else (grad_h.float() * scale).to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                temperature: float, chunk: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lses = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            z = chunk_logits(hidden[start:start + chunk], weight, temperature)  # [c, V]
            lses[start:start + chunk] = z.logsumexp(-1)
            y = targets[start:start + chunk].unsqueeze(1)
            out[start:start + chunk] = z.gather(1, y).squeeze(1) - lses[start:start + chunk]
        ctx.save_for_backward(hidden, weight, targets, lses)
        ctx.temperature, ctx.chunk, ctx.split = temperature, chunk, None
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Each chunk's logits recomputed: ``dz = g (onehot(y) - softmax(z/t)) / t``; over a vocabulary split
        (``ctx.split``) the one-hot only where the target is this rank's, and ``dh`` summed over the ranks."""
        hidden, weight, targets, lses = ctx.saved_tensors
        t, chunk, split = ctx.temperature, ctx.chunk, ctx.split
        wants_h, wants_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if wants_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_w else None
        g = grad_out.float()
        for start in range(0, hidden.shape[0], chunk):
            h, gc, y = hidden[start:start + chunk], g[start:start + chunk], targets[start:start + chunk]
            z = chunk_logits(h, weight, t)
            dz = z.sub_(lses[start:start + chunk].unsqueeze(1)).exp_().mul_(-gc.unsqueeze(1) / t)  # -g p / t
            if split is None:
                dz.scatter_add_(1, y.unsqueeze(1), (gc / t).unsqueeze(1))
            else:
                here, index = split.locate(y)
                dz.scatter_add_(1, index, (gc / t * here.float()).unsqueeze(1))
            if grad_h is not None:
                grad_h[start:start + chunk] = dz.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(dz.T, h.float())
        if split is not None:
            split.sum_over_ranks(grad_h)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


class VocabSplit:
    """A head split by vocabulary rows over one mesh dimension: this rank's rows ``[offset, offset + rows)`` of
    ``vocab``, its local weight (differentiable: its gradient becomes the DTensor's), and the ranks' group."""

    def __init__(self, local: torch.Tensor, offset: int, vocab: int, group: Any) -> None:
        self.local, self.offset, self.vocab, self.group = local, offset, vocab, group
        self.ranks = dist.get_world_size(group)
        # Rows per chunk: a chunk of the one-process size on each rank, the same number on every rank (each chunk
        # is a collective), from the largest rank's rows.
        self.chunk = chunk_rows(-(-vocab // self.ranks))

    @classmethod
    def of(cls, weight: torch.Tensor) -> tuple[VocabSplit | None, torch.Tensor]:
        """``weight``'s split when it is a DTensor laid out as ``Shard(0)`` over a 1-D mesh with rows on every
        rank (tensor parallelism's vocabulary-parallel head), else None and the weight whole: a plain tensor as it
        is, any other DTensor gathered (differentiably), which these functions then score as one."""
        if not is_split(weight):
            return None, weight
        from torch.distributed.tensor import Shard

        mesh, vocab = weight.device_mesh, weight.shape[0]
        step = -(-vocab // mesh.size())  # DTensor's Shard(0) gives each rank ceil(V / ranks) rows, the last fewer
        if mesh.ndim == 1 and tuple(weight.placements) == (Shard(0),):
            offset = mesh.get_local_rank() * step
            local = weight.to_local()
            if 0 < local.shape[0] == min(step, vocab - offset):
                return cls(local, offset, vocab, mesh.get_group()), weight
        return None, weight.full_tensor()

    def chunk_stats(self, z: torch.Tensor, y: torch.Tensor, smoothing: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """For one chunk's local logits ``z`` ``[c, V_r]`` and targets ``y``: the whole rows' log-sum-exp, the
        targets' logits and (``smoothing``) the rows' logit sums, from one all-gather; and where the targets are
        here (mask ``[c]``, local index ``[c, 1]``)."""
        here, index = self.locate(y)
        parts = [z.logsumexp(-1), z.gather(1, index).squeeze(1).masked_fill(~here, 0.0)]
        if smoothing:
            parts.append(z.sum(-1))
        mine = torch.stack(parts)  # [k, c]
        every = torch.empty((self.ranks * mine.shape[0], mine.shape[1]), dtype=mine.dtype, device=mine.device)
        dist.all_gather_single(every, mine, group=self.group)
        every = every.view(self.ranks, *mine.shape)  # [ranks, k, c]
        lse = every[:, 0].logsumexp(0)
        picked = every[:, 1].sum(0)
        total = every[:, 2].sum(0) if smoothing else None
        return lse, picked, total, here, index

    def locate(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which targets are this rank's rows (mask ``[c]``), and their local index (``[c, 1]``; 0 elsewhere)."""
        rows = self.local.shape[0]
        here = (y >= self.offset) & (y < self.offset + rows)
        return here, (y - self.offset).clamp(0, rows - 1).unsqueeze(1)

    def sum_over_ranks(self, grad_h: torch.Tensor | None) -> torch.Tensor | None:
        """``dh`` of the whole vocabulary: each rank's part came from its own rows."""
        if grad_h is not None:
            dist.all_reduce(grad_h, group=self.group)
        return grad_h


class _SplitCrossEntropy(torch.autograd.Function):
    """``_LinearCrossEntropy`` over a vocabulary split: the same maths on each rank's rows."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                smoothing: float, chunk: int, differentiable: bool, split: VocabSplit) -> torch.Tensor:
        wants_h = differentiable and ctx.needs_input_grad[0]
        wants_w = differentiable and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if wants_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            z = chunk_logits(h, weight)  # [c, V_r]
            lse, picked, logit_sum, here, index = split.chunk_stats(z, y, bool(smoothing))
            rows = lse - picked
            if logit_sum is not None:
                rows = (1 - smoothing) * rows + smoothing * (lse - logit_sum / split.vocab)
            total += rows.sum()
            if grad_h is None and grad_w is None:
                continue
            dz = z.sub_(lse.unsqueeze(1)).exp_()  # this rank's part of the softmax
            dz.scatter_add_(1, index, (-(1 - smoothing) * here.float()).unsqueeze(1))
            if smoothing:
                dz.sub_(smoothing / split.vocab)
            dz = dz.to(weight.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk] = dz @ weight
            if grad_w is not None:
                grad_w.addmm_(dz.T.float(), h.float())
        ctx.save_for_backward(split.sum_over_ranks(grad_h), grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dh, dw, *_ = _LinearCrossEntropy.backward(ctx, grad_out)
        return dh, dw, None, None, None, None, None


class _SplitTokenLogps(torch.autograd.Function):
    """``_LinearTokenLogps`` over a vocabulary split."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                temperature: float, chunk: int, split: VocabSplit) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lses = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            z = chunk_logits(hidden[start:start + chunk], weight, temperature)  # [c, V_r]
            lse, picked, _, _, _ = split.chunk_stats(z, targets[start:start + chunk], False)
            lses[start:start + chunk] = lse
            out[start:start + chunk] = picked - lse
        ctx.save_for_backward(hidden, weight, targets, lses)
        ctx.temperature, ctx.chunk, ctx.split = temperature, chunk, split
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (*_LinearTokenLogps.backward(ctx, grad_out), None)
