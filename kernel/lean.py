"""``[train] lean_activations``: keep what backward needs once, and recompute the cheap rest.

Measured on SmolLM2-135M with LoRA on every linear layer under bfloat16 autocast (8 x 256 tokens), a decoder layer
holds about 53 MB of activations for backward. A third of that is copies: the same numbers kept several times, or
kept in float32 where backward could rebuild them from a bfloat16 input in microseconds. Three rewrites remove
them, each numerically the same as the module it replaces:

- **A LoRA layer keeps its input once** (``LoraLinear``). peft's ``lora.Linear`` casts its input to the adapter's
  dtype (float32) and autocast casts it back, so each adapter keeps a bfloat16 copy of its own: q, k and v keep
  three copies of the same normed input, gate and up two. One ``autograd.Function`` runs the base layer and the
  adapter on the input as given and keeps it, so the three projections of one input keep one tensor between them.
  Its maths are the eager path's, op for op, in the same dtypes.
- **A python RMSNorm is recomputed** (``recomputed``). HF's ``LlamaRMSNorm`` keeps a float32 copy of its input
  and of the normed result; recomputing it in backward from its (bfloat16) input keeps only that input.
- **The gated activation is recomputed** (``act_fn(gate) * up``): it keeps gate and up, not also ``act_fn(gate)``.

The recomputations use ``torch.utils.checkpoint`` (non-reentrant) around these elementwise ops only: the
matmuls are never run twice, so a step costs what it did. What each rewrite saves for one model and shape is
``bench/lean_activations.py``'s to say.

Only while gradients are on; evaluation and generation run the modules' own ``forward``. Each call falls back to
the module's own ``forward`` where the rewrite does not apply: a LoRA layer with dropout, DoRA, a bias of its own,
several active adapters, a quantized or non-Linear base, hooks on its sub-layers (DeepSpeed ZeRO-3 gathers weights
in them), DTensor weights (tensor parallelism), or dtypes that autocast does not align.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

GATED = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"  # Llama's MLP, and its copies'


class LoraLinear(torch.autograd.Function):
    """``base(x) + B(A(x)) * scale``, keeping ``x`` once (in the compute dtype) and ``A(x)`` (rank-wide).

    ``x`` is passed twice, itself for the adapter's path and a view of it for the base's, so that autograd adds
    their gradients to ``x``'s in the order eager peft does (the adapter's, then the base's through the view's
    node, which runs next): in bfloat16 the order of a sum changes its last bits, and these gradients are then the
    eager path's bit for bit. (A view, not ``x`` twice: dynamo does not trace a Function given one tensor twice.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xc, w, a_c, b_c = x.to(dtype), weight.to(dtype), a.to(dtype), b.to(dtype)
            out = F.linear(xc, w, None if bias is None else bias.to(dtype))  # [..., out]
            xa = F.linear(xc, a_c)  # [..., r]
            out = out + F.linear(xa, b_c) * scale
        ctx.scale, ctx.dtypes = scale, (x.dtype, dtype, a.dtype, b.dtype)
        # A cast copy of the weight is cast again in backward rather than kept (a frozen float32 base under
        # autocast: eager keeps that bfloat16 copy for backward, as much memory as the model's weights).
        ctx.save_for_backward(xc, weight, a_c, b_c, xa)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, weight, a_c, b_c, xa = ctx.saved_tensors
        x_dtype, dtype, a_dtype, b_dtype = ctx.dtypes
        w = weight.to(dtype)
        grads: list[torch.Tensor | None] = [None] * 8
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1])  # [N, out]
            x2, xa2 = xc.reshape(-1, xc.shape[-1]), xa.reshape(-1, xa.shape[-1])  # [N, in], [N, r]
            gs = g * ctx.scale
            grad_xa = gs.mm(b_c)  # [N, r]
            shape = (*grad.shape[:-1], xc.shape[-1])
            if ctx.needs_input_grad[0]:
                grads[0] = grad_xa.mm(a_c).to(x_dtype).view(shape)
            if ctx.needs_input_grad[1]:
                grads[1] = g.mm(w).to(x_dtype).view(shape)
            if ctx.needs_input_grad[2]:
                grads[2] = g.t().mm(x2).to(weight.dtype)
            if ctx.needs_input_grad[3]:
                grads[3] = g.sum(0).to(weight.dtype)
            if ctx.needs_input_grad[4]:
                grads[4] = grad_xa.t().mm(x2).to(a_dtype)
            if ctx.needs_input_grad[5]:
                grads[5] = gs.t().mm(xa2).to(b_dtype)
        return tuple(grads)


def _split(tensor: torch.Tensor) -> bool:
    """A weight that is a DTensor (tensor parallelism) or partitioned by DeepSpeed ZeRO-3."""
    if hasattr(tensor, "ds_id"):
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")  # never imported: no DTensor can exist
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _hooked(*modules: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def plain_lora(layer: Any, name: str) -> bool:
    """Adapter ``name`` of a peft LoRA layer is plain LoRA on a plain ``nn.Linear``: what ``LoraLinear`` computes
    (no dropout, DoRA or other variant, adapter bias, or quantized base)."""
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or \
            not getattr(layer, "cast_input_dtype_enabled", True):
        return False
    base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    return type(base) is torch.nn.Linear and type(a) is torch.nn.Linear and type(b) is torch.nn.Linear and \
        a.bias is None and b.bias is None and type(layer.lora_dropout[name]) is torch.nn.Identity


def lora_compute_dtype(layer: Any, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused LoRA path computes ``layer(x)`` in, or None where it does not apply (own forward)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if not plain_lora(layer, name):
        return None
    base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if _hooked(base, a, b) or any(_split(t) for t in (base.weight, a.weight, b.weight)):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    dtypes = {x.dtype, base.weight.dtype, a.weight.dtype, b.weight.dtype}
    return x.dtype if len(dtypes) == 1 else None


class LeanLora:
    """Mixed into a peft ``lora.Linear``: the fused path where it applies, the layer's own forward elsewhere."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = lora_compute_dtype(self, x) if torch.is_grad_enabled() and not args and not kwargs else None
        if dtype is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        name = self.active_adapters[0]  # type: ignore[attr-defined]
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]  # type: ignore[attr-defined]
        return LoraLinear.apply(x, x.view_as(x), base.weight, base.bias, a.weight, b.weight,  # type: ignore[no-any-return]
                                self.scaling[name], dtype)  # type: ignore[attr-defined]


def _recompute(module: torch.nn.Module, forward: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``forward(*inputs)``, under non-reentrant checkpointing while gradients are on: backward recomputes it from
    its inputs instead of keeping what it saved."""
    if not torch.is_grad_enabled() or any(_split(t) for t in (*inputs, *module.parameters(recurse=False))):
        return forward(*inputs)
    out: torch.Tensor = checkpoint(forward, *inputs, use_reentrant=False, preserve_rng_state=False)
    return out


class LeanNorm:
    """Mixed into a python RMSNorm: recomputed in backward from its input."""

    def forward(self, *inputs: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs or not all(isinstance(t, torch.Tensor) for t in inputs):
            return super().forward(*inputs, **kwargs)  # type: ignore[misc,no-any-return]
        return _recompute(self, super().forward, *inputs)  # type: ignore[misc]


class LeanGated:
    """Mixed into a Llama-style MLP: ``act_fn(gate) * up`` recomputed in backward."""

    def product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up  # type: ignore[attr-defined,no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_recompute(self, self.product,  # type: ignore[attr-defined,arg-type,no-any-return]
                                         self.gate_proj(x), self.up_proj(x)))  # type: ignore[attr-defined]


def _source(cls: type) -> str:
    try:
        return "".join(inspect.getsource(cls.forward).split())  # type: ignore[attr-defined]
    except (OSError, TypeError):
        return ""


def rewrite(module: torch.nn.Module) -> str:
    """Which rewrite ``module`` takes ("lora", "norm", "gated"), "peft" for a LoRA layer left as peft runs it, or
    "" for none."""
    kind = type(module)
    if issubclass(kind, (LeanLora, LeanNorm, LeanGated)):
        return ""  # already rewritten
    if hasattr(module, "lora_A") and hasattr(module, "base_layer"):  # peft's LoRA layers
        active = getattr(module, "active_adapters", [])
        return "lora" if len(active) == 1 and plain_lora(module, active[0]) else "peft"
    if kind.__name__.endswith("RMSNorm") and kind.__module__.startswith("transformers."):
        return "norm"
    if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and \
            "".join(GATED.split()) in _source(kind):
        return "gated"
    return ""


MIXINS: dict[str, type] = {"lora": LeanLora, "norm": LeanNorm, "gated": LeanGated}
_CLASSES: dict[tuple[type, type], type] = {}


def lean_class(kind: type, mixin: type) -> type:
    """``kind`` with ``mixin``'s forward in front, made once per pair (a class, so a copy of the model is lean too)."""
    if (kind, mixin) not in _CLASSES:
        _CLASSES[kind, mixin] = type(f"Lean{kind.__name__}", (mixin, kind), {"__module__": kind.__module__})
    return _CLASSES[kind, mixin]


def lean_activations(model: torch.nn.Module, checkpointed: bool = False) -> dict[str, int]:
    """Rewrite ``model``'s modules in place; how many of each kind ("peft": LoRA layers left as they are).
    ``checkpointed``: the model recomputes its layers whole (``gradient_checkpointing``), so recomputing norms and
    activations inside them would only run them a third time; the LoRA rewrite alone still saves the
    recomputation's copies."""
    counts = {"lora": 0, "norm": 0, "gated": 0, "peft": 0}
    for module in model.modules():
        what = rewrite(module)
        if what == "peft":
            counts[what] += 1
        elif what and not (checkpointed and what != "lora"):
            module.__class__ = lean_class(type(module), MIXINS[what])
            counts[what] += 1
    return counts


def lean_line(counts: dict[str, int]) -> str:
    parts = [f"{counts['lora']} LoRA layers keep their input once" if counts["lora"] else "",
             f"{counts['norm']} norms and {counts['gated']} gated activations recomputed in backward"
             if counts["norm"] or counts["gated"] else "",
             f"{counts['peft']} LoRA layers run as peft runs them (dropout, DoRA, a quantized base or an adapter "
             "bias: lora_dropout = 0 lets plain LoRA layers keep one copy of their input)" if counts["peft"] else ""]
    return "; ".join(p for p in parts if p) or "nothing in this model to rewrite"
