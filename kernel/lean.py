"""``[train] lean_activations``: keep what backward needs once, and recompute the cheap rest.

Measured on SmolLM2-135M with LoRA on every linear layer under bfloat16 autocast, 8 x 256 tokens: autograd keeps
1589 MB for backward, 53 MB per decoder layer. Half of it is copies: the same numbers kept several times, or
kept where backward can rebuild them from other kept tensors with a few elementwise ops. Three rewrites of the
model's modules remove them (825 MB left: ``bench/lean_activations.py``), each giving the eager module's
gradients bit for bit:

- **A plain LoRA layer keeps its input once** (``LoraLinear``). peft's ``lora.Linear`` casts its input to the
  adapter's dtype (float32) and autocast casts it back, so each adapter keeps a bfloat16 copy of its own: q, k
  and v keep three copies of the same normed input, gate and up two. One ``autograd.Function`` runs the base layer
  and the adapter on the input as given and keeps it, so the projections of one input share one tensor. Its maths
  are the eager path's, op for op, in the same dtypes.
- **A python RMSNorm is recomputed** (``LeanNorm``). transformers' ``LlamaRMSNorm`` keeps float32 copies of its
  input and of the normed result; recomputed in backward, it keeps only its (bfloat16) input.
- **The gated MLP keeps gate and up only** (``LeanGated``). Eager keeps four tensors of the MLP's width: gate (for
  the activation), ``act_fn(gate)`` and up (for the product), and the product (for ``down_proj``). With SiLU and a
  plain (or plain LoRA) ``down_proj``, one ``autograd.Function`` (``GatedDown``) runs the product and the down
  projection and keeps gate and up, rebuilding the product in backward; with another activation, ``act_fn(gate) *
  up`` alone is recomputed (three tensors kept).

The norm and the other activations are recomputed under ``torch.utils.checkpoint`` (non-reentrant). No matmul is
ever run twice. ``bench/kernel_overhead.py --lean-activations false`` and ``bench/tuner_memory.py
--lean-activations false`` measure without them.

A LoRA layer with dropout, DoRA, an adapter bias or a quantized base is left as peft runs it: each dropped input
is an adapter's own, so there is no copy to share. A rewritten module runs its own ``forward`` where gradients
are off (evaluation, generation), and, call by call, where its weights are DTensors (tensor parallelism) or
partitioned by DeepSpeed ZeRO-3, where its sub-layers have hooks (ZeRO-3 gathers weights in them), where the
adapter is disabled, merged or not the only one active, or where dtypes are mixed without autocast.
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


class GatedDown(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a plain ``nn.Linear`` down projection, or a plain LoRA one (``a``, ``b`` not
    None), keeping gate and up only: the product ``silu(gate) * up`` (what ``down`` would keep) is recomputed in
    backward. Each op is the eager path's, in the same dtypes, so the gradients are eager's bit for bit."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor | None, b: torch.Tensor | None, scale: float, dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(gate.device.type, enabled=False):
            product = (F.silu(gate) * up).to(dtype)  # [..., inter]
            out = F.linear(product, weight.to(dtype), None if bias is None else bias.to(dtype))  # [..., hidden]
            xa = None
            if a is not None and b is not None:
                xa = F.linear(product, a.to(dtype))  # [..., r]
                out = out + F.linear(xa, b.to(dtype)) * scale
        ctx.scale, ctx.dtype, ctx.lora = scale, dtype, xa is not None
        ctx.save_for_backward(gate, up, weight, a, b, xa)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, weight, a, b, xa = ctx.saved_tensors
        dtype = ctx.dtype
        grads: list[torch.Tensor | None] = [None] * 8
        with torch.autocast(grad.device.type, enabled=False):
            act = F.silu(gate)
            product = (act * up).to(dtype)
            g = grad.reshape(-1, grad.shape[-1])  # [N, hidden]
            p2 = product.reshape(-1, product.shape[-1])  # [N, inter]
            grad_p = g.mm(weight.to(dtype))  # the base's share of the product's gradient
            if ctx.lora:
                gs = g * ctx.scale
                grad_xa = gs.mm(b.to(dtype))  # [N, r]
                grad_p = grad_xa.mm(a.to(dtype)) + grad_p  # the adapter's arrives first in eager peft
                if ctx.needs_input_grad[4]:
                    grads[4] = grad_xa.t().mm(p2).to(a.dtype)
                if ctx.needs_input_grad[5]:
                    grads[5] = gs.t().mm(xa.reshape(-1, xa.shape[-1])).to(b.dtype)
            if ctx.needs_input_grad[2]:
                grads[2] = g.t().mm(p2).to(weight.dtype)
            if ctx.needs_input_grad[3]:
                grads[3] = g.sum(0).to(weight.dtype)
            grad_p = grad_p.to(up.dtype).view(up.shape)
            if ctx.needs_input_grad[0]:
                grads[0] = torch.ops.aten.silu_backward(grad_p * up, gate)
            if ctx.needs_input_grad[1]:
                grads[1] = grad_p * act
        return tuple(grads)


class LeanGated:
    """Mixed into a Llama-style MLP: what ``act_fn(gate) * up`` and ``down_proj`` keep, recomputed in backward
    from gate and up (``GatedDown``: SiLU and a plain or plain-LoRA down projection), or ``act_fn(gate) * up``
    alone recomputed (any other activation, any other down projection)."""

    def product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up  # type: ignore[attr-defined,no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj  # type: ignore[attr-defined]
        if (dtype := self.fused_down(gate)) is not None:
            if isinstance(down, LeanLora):
                name = down.active_adapters[0]  # type: ignore[attr-defined]
                base, a, b = down.base_layer, down.lora_A[name].weight, down.lora_B[name].weight  # type: ignore
                return GatedDown.apply(gate, up, base.weight, base.bias, a, b,  # type: ignore[no-any-return]
                                       down.scaling[name], dtype)  # type: ignore[attr-defined]
            return GatedDown.apply(gate, up, down.weight, down.bias, None, None, 1.0,  # type: ignore[no-any-return]
                                   dtype)
        return down(_recompute(self, self.product, gate, up))  # type: ignore[no-any-return]

    def fused_down(self, gate: torch.Tensor) -> torch.dtype | None:
        """The dtype ``GatedDown`` runs the down projection in, or None where it does not apply."""
        down = self.down_proj  # type: ignore[attr-defined]
        if not torch.is_grad_enabled() or not getattr(self, "lean_silu", False):  # set when rewritten
            return None
        if isinstance(down, LeanLora):  # its own hooks too: GatedDown runs in its stead, not through it
            return None if _hooked(down) else lora_compute_dtype(down, gate)
        if type(down) is not torch.nn.Linear or _hooked(down) or _split(down.weight):
            return None
        if torch.is_autocast_enabled(gate.device.type):
            return torch.get_autocast_dtype(gate.device.type)
        return gate.dtype if gate.dtype == down.weight.dtype else None


def _silu(act: torch.nn.Module) -> bool:
    """``act`` computes ``F.silu`` (torch's ``SiLU``, transformers' ``SiLUActivation`` not swapped for a kernel)."""
    return "forward" not in vars(act) and (type(act) is torch.nn.SiLU or (
        type(act).__name__ == "SiLUActivation" and "returnnn.functional.silu(input)" in _source(type(act))))


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
            if what == "gated":
                module.lean_silu = _silu(module.act_fn)  # read at each call: found once (dynamo cannot inspect)
            counts[what] += 1
    return counts


def lean_line(counts: dict[str, int]) -> str:
    parts = [f"{counts['lora']} LoRA layers keep their input once" if counts["lora"] else "",
             f"{counts['norm']} norms and {counts['gated']} gated activations recomputed in backward"
             if counts["norm"] or counts["gated"] else "",
             f"{counts['peft']} LoRA layers run as peft runs them (dropout, DoRA, a quantized base or an adapter "
             "bias: lora_dropout = 0 lets plain LoRA layers keep one copy of their input)" if counts["peft"] else ""]
    return "; ".join(p for p in parts if p) or "nothing in this model to rewrite"
