"""Forward passes that stop before the LM head: the kernel's default for a causal LM (``[train] chunked_loss``).

The model runs as usual (through its DDP or DeepSpeed wrapper, so gradients still synchronise), asked for no
logits (transformers' ``logits_to_keep`` given an empty index); a hook on its decoder keeps the final hidden
states. The loss then reads ``ModelOutputs(hidden=..., head=...)``: ``contracts.token_cross_entropy`` and
``token_logps`` score only the labelled positions, chunk by chunk, and a loss that reads ``outputs.logits`` still
gets them.

The hidden states and the head's weight are cast to the dtype the head's matmul would have run in (the autocast
dtype), so the logits are the same numbers the model's own head gives, except on a CPU without native bfloat16
or float16 arithmetic (no AVX512-BF16/AMX: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is False), where the
head's matmuls run in float32. There, bfloat16 is emulated: measured on the 2-core AVX2 EPYC these machines are,
the head of SmolLM2 (576 x 49 152) for 256 tokens takes 1.5 s forward in bfloat16 against 0.29 s in float32, and
its backward to the hidden states (``dlogits @ W``, what autocast's ``F.linear`` backward runs) 80 s against
0.28 s.

It is off, with the reason, when the head is not a plain ``nn.Linear`` without bias (a LoRA-wrapped or
quantized head), when the model has no decoder to hook or cannot skip its logits, when its parameters are
sharded (FSDP2, ZeRO-3: the head's weight exists whole only inside its own forward), and when the first batch's
logits differ from ``hidden @ head.T`` (a model that scales or caps its logits). Under tensor parallelism the
head's weight is a DTensor split by vocabulary rows, handed to the losses as it is (``contracts.chunked``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from swiftk.contracts import ModelOutputs
from swiftk.contracts.chunked import head_logits, is_split
from swiftk.kernel.precision import native_half

NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: the index of no position
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ChunkedHead:
    """How to run ``model`` to its hidden states and what its head's weight is."""

    def __init__(self, decoder: torch.nn.Module, head: torch.nn.Linear) -> None:
        self.decoder, self.head = decoder, head
        self.verified = False
        self.cast: tuple[tuple[int, int, torch.dtype], torch.Tensor] | None = None  # a frozen head, cast once

    @classmethod
    def of(cls, model: torch.nn.Module) -> tuple[ChunkedHead | None, str]:
        """The path for ``model`` (unwrapped, adapters included), or None and why it cannot have one."""
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        get_head, get_decoder = getattr(base, "get_output_embeddings", None), getattr(base, "get_decoder", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, torch.nn.Linear) and (why := unusable(head.weight)):
            return None, why
        if type(head) is not torch.nn.Linear or head.bias is not None:
            what = "none" if head is None else type(head).__name__ + (" with a bias" if head is not None and
                                                                       getattr(head, "bias", None) is not None else "")
            return None, f"the output layer is {what}, not a plain Linear"
        decoder = get_decoder() if callable(get_decoder) else None
        if not isinstance(decoder, torch.nn.Module) or decoder is base:
            return None, f"{type(base).__name__} has no decoder module to take the hidden states from"
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return None, f"{type(base).__name__}.forward cannot skip its logits (no logits_to_keep)"
        config = getattr(base, "config", None)
        for key in SCALED_LOGITS:
            if getattr(config, key, None) not in (None, 1, 1.0):
                return None, f"the model's logits are scaled or capped ({key} = {getattr(config, key)})"
        return cls(decoder, head), ""

    def outputs(self, model: torch.nn.Module, batch: Any) -> ModelOutputs:
        """The hidden states ``[B, T, H]`` and head ``[V, H]`` of ``batch``, in the head's compute dtype."""
        # A vocabulary-split head cannot run on no positions (DTensor's sharding rules divide by the empty length):
        # it computes the last position's logits, unused.
        keep = 1 if is_split(self.head.weight) else NO_LOGITS.to(batch.input_ids.device)
        hidden, _ = self.run(model, batch, logits_to_keep=keep)
        dtype = matmul_dtype(hidden.device, self.head.weight.dtype)
        return ModelOutputs(hidden=hidden.to(dtype), head=self.weight(dtype))

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The head's weight in ``dtype``. A frozen head (LoRA, QLoRA) is cast once and the same tensor handed out
        until the weight changes, so a loss in a plugin host finds it already in shared memory."""
        weight = self.head.weight
        if weight.dtype == dtype or weight.requires_grad:
            return weight.to(dtype)  # the parameter itself, or a cast that gradients flow through
        local = weight.to_local() if is_split(weight) else weight  # a DTensor's own storage is its local piece
        key = (local._version, local.data_ptr(), dtype)
        if self.cast is None or self.cast[0] != key:
            self.cast = (key, weight.detach().to(dtype))
        return self.cast[1]

    def check_once(self, model: torch.nn.Module, batch: Any) -> str:
        """``differs`` on the first batch it is asked about, "" afterwards: why this path cannot be used."""
        if self.verified:
            return ""
        why = self.differs(model, batch)
        self.verified = not why
        return why

    def differs(self, model: torch.nn.Module, batch: Any) -> str:
        """Why this model's logits are not ``hidden @ head.T`` on ``batch`` (empty when they are), from one
        forward pass without gradient, in eval mode (no dropout: the run's random stream is not touched, so a
        resumed run draws the same numbers as the uninterrupted one). A check that cannot run says why."""
        if unusable(self.head.weight):
            return unusable(self.head.weight)
        try:
            return self.compare(model, batch)
        except Exception as exc:  # weights on several devices, offloaded...: the logits path works there
            return f"the check of hidden @ head.T failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"

    def compare(self, model: torch.nn.Module, batch: Any) -> str:
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                hidden, out = self.run(model, batch)
                logits = out.logits
                computed = head_logits(hidden.to(logits.dtype), self.head.weight.to(logits.dtype))
        finally:
            model.train(training)
        if computed.shape != logits.shape:
            return f"the hidden states give logits {tuple(computed.shape)}, the model {tuple(logits.shape)}"
        gap = float((computed.float() - logits.float()).abs().max())
        scale = float(logits.float().abs().max())
        if not gap <= 1e-3 * max(scale, 1.0):
            return f"the model's logits differ from hidden @ head.T by up to {gap:.3g} (largest logit {scale:.3g})"
        return ""

    def run(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The decoder's last hidden states and the model's output, from one forward pass of ``model``."""
        captured: list[torch.Tensor] = []

        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = self.decoder.register_forward_hook(keep)
        try:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False, **batch.model_inputs, **kwargs)
        finally:
            handle.remove()
        hidden = captured[-1]
        if is_split(hidden):  # split by positions (sequence parallelism): gathered, its gradient cut back
            hidden = hidden.full_tensor()
        return hidden, out


def matmul_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's where it is on, else the weight's; float32 instead of a
    16-bit type that this CPU only emulates."""
    kind = device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight_dtype
    if kind == "cpu" and dtype in (torch.bfloat16, torch.float16) and not native_half(dtype):
        return torch.float32
    return dtype


def unusable(weight: torch.Tensor) -> str:
    """Why this head's weight cannot be used outside the head's own forward (empty when it can)."""
    if hasattr(weight, "ds_id") or weight.dim() != 2 or weight.numel() == 0 or weight.is_meta:
        return "the head's weight is partitioned or offloaded (DeepSpeed ZeRO-3, meta); it exists whole only " \
               "inside the head's forward"
    return ""
