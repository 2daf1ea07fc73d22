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

With ``"auto"``, the default, the rewrites are made where the model has LoRA layers (``wanted``): with a frozen
base they make a step faster as well as leaner. A full fine-tune has no LoRA copies to remove, only the
recomputation to pay, so ``true`` asks for it there.

A LoRA layer with dropout, DoRA, an adapter bias or a quantized base is left as peft runs it: each dropped input
is an adapter's own, so there is no copy to share. A rewritten module runs its own ``forward`` where gradients
are off (evaluation, generation), and, call by call, where its weights are DTensors (tensor parallelism) or
partitioned by DeepSpeed ZeRO-3, where its sub-layers have hooks (ZeRO-3 gathers weights in them), where the
adapter is disabled, merged or not the only one active, or where dtypes are mixed without autocast.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from swiftk.contracts.chunked import is_split

GATED = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"  # Llama's MLP, and its copies'


def adapted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor | None,
            b: torch.Tensor | None, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``base(x) + B(A(x)) * scale`` (``base(x)`` alone where ``a`` is None) in ``dtype``, op for op as eager peft
    computes it under autocast: the output, and ``A(x)`` (rank-wide) for backward."""
    with torch.autocast(x.device.type, enabled=False):
        out = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))  # [..., out]
        if a is None or b is None:
            return out, None
        xa = F.linear(x, a.to(dtype))  # [..., r]
        return out + F.linear(xa, b.to(dtype)) * scale, xa


def adapted_grads(ctx: Any, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None,
                  b: torch.Tensor | None, xa: torch.Tensor | None, from_adapter: bool, from_base: bool
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
    """``adapted``'s backward, as eager's autograd computes it: ``x``'s gradient through the adapter and through the
    base, each as ``[N, in]`` in ``ctx.dtype`` where asked for (else None), and the gradients of weight, bias, ``a``
    and ``b`` where ``ctx.needs_input_grad[2:6]`` asks for them (a Function's inputs 2 to 5)."""
    dtype, needs = ctx.dtype, ctx.needs_input_grad
    params: list[torch.Tensor | None] = [None] * 4
    adapter_share = base_share = None
    with torch.autocast(grad.device.type, enabled=False):
        g = grad.reshape(-1, grad.shape[-1])  # [N, out]
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        if from_base:
            base_share = g.mm(weight.to(dtype))
        if needs[2]:
            params[0] = g.t().mm(x2).to(weight.dtype)
        if needs[3]:
            params[1] = g.sum(0).to(weight.dtype)
        if a is not None and b is not None and xa is not None:
            gs = g * ctx.scale
            grad_xa = gs.mm(b.to(dtype))  # [N, r]
            if from_adapter:
                adapter_share = grad_xa.mm(a.to(dtype))
            if needs[4]:
                params[2] = grad_xa.t().mm(x2).to(a.dtype)
            if needs[5]:
                params[3] = gs.t().mm(xa.reshape(-1, xa.shape[-1])).to(b.dtype)
    return adapter_share, base_share, params


class LoraLinear(torch.autograd.Function):
    """``base(x) + B(A(x)) * scale``, keeping ``x`` once (in the compute dtype) and ``A(x)`` (rank-wide).

    ``x`` is passed twice, itself for the adapter's path and a view of it for the base's, so that autograd adds
    their gradients to ``x``'s in the order eager peft does (the adapter's, then the base's through the view's
    node, which runs next): in bfloat16 the order of a sum changes its last bits, and these gradients are then the
    eager path's bit for bit. (A view, not ``x`` twice: dynamo does not trace a Function given one tensor twice.)
    Weights are kept as they are and cast again in backward: a frozen float32 base under autocast would otherwise
    keep a bfloat16 copy of itself, as eager does, as much memory as the model's weights."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_base: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        xc = x.to(dtype)
        out, xa = adapted(xc, weight, bias, a, b, scale, dtype)
        ctx.scale, ctx.dtype, ctx.x_dtype = scale, dtype, x.dtype
        ctx.save_for_backward(xc, weight, a, b, xa)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, weight, a, b, xa = ctx.saved_tensors
        adapter_share, base_share, params = adapted_grads(ctx, grad, xc, weight, a, b, xa, *ctx.needs_input_grad[:2])
        shape = (*grad.shape[:-1], xc.shape[-1])
        x_grads = [None if t is None else t.to(ctx.x_dtype).view(shape) for t in (adapter_share, base_share)]
        return (*x_grads, *params, None, None)


def _split(tensor: torch.Tensor) -> bool:
    """A weight that is a DTensor (tensor parallelism) or partitioned by DeepSpeed ZeRO-3."""
    return hasattr(tensor, "ds_id") or is_split(tensor)


def _hooked(*modules: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _compute_dtype(x: torch.Tensor, *weights: torch.Tensor) -> torch.dtype | None:
    """What eager computes ``x`` against ``weights`` in: autocast's dtype, or their one dtype (None when mixed)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if {x.dtype, *(w.dtype for w in weights)} == {x.dtype} else None


def plain_lora(layer: Any, name: str) -> bool:
    """Adapter ``name`` of a peft LoRA layer is plain LoRA on a plain ``nn.Linear``: what ``LoraLinear`` computes
    (no dropout, DoRA or other variant, adapter bias, or quantized base)."""
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or \
            not getattr(layer, "cast_input_dtype_enabled", True):
        return False
    base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    return type(base) is torch.nn.Linear and type(a) is torch.nn.Linear and type(b) is torch.nn.Linear and \
        a.bias is None and b.bias is None and type(layer.lora_dropout[name]) is torch.nn.Identity


def adapter(layer: Any) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, float]:
    """A plain LoRA layer's base, its active adapter's A and B weights, and its scale."""
    name = layer.active_adapters[0]
    return layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


def lora_compute_dtype(layer: Any, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused LoRA path computes ``layer(x)`` in, or None where it does not apply (own forward)."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1 or \
            not plain_lora(layer, layer.active_adapters[0]):
        return None
    name = layer.active_adapters[0]
    base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if _hooked(base, a, b) or any(_split(t) for t in (base.weight, a.weight, b.weight)):
        return None
    return _compute_dtype(x, base.weight, a.weight, b.weight)


class LeanLora:
    """Mixed into a peft ``lora.Linear``: the fused path where it applies, the layer's own forward elsewhere."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = lora_compute_dtype(self, x) if torch.is_grad_enabled() and not args and not kwargs else None
        if dtype is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        base, a, b, scale = adapter(self)
        return LoraLinear.apply(x, x.view_as(x), base.weight, base.bias, a, b, scale,  # type: ignore[no-any-return]
                                dtype)


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
        out, xa = adapted(product, weight, bias, a, b, scale, dtype)  # [..., hidden]
        ctx.scale, ctx.dtype = scale, dtype
        ctx.save_for_backward(gate, up, weight, a, b, xa)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, weight, a, b, xa = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            act = F.silu(gate)
            product = (act * up).to(ctx.dtype)
        to_product = any(ctx.needs_input_grad[:2])  # gate's or up's gradient passes through the product's
        adapter_share, base_share, params = adapted_grads(ctx, grad, product, weight, a, b, xa, to_product,
                                                          to_product)
        grad_gate = grad_up = None
        if base_share is not None:
            # The product's gradient: the adapter's share arrives first in eager peft, then the base's.
            grad_p = base_share if adapter_share is None else adapter_share + base_share
            grad_p = grad_p.to(up.dtype).view(up.shape)
            if ctx.needs_input_grad[0]:
                grad_gate = torch.ops.aten.silu_backward(grad_p * up, gate)
            if ctx.needs_input_grad[1]:
                grad_up = grad_p * act
        return (grad_gate, grad_up, *params, None, None)


class LeanGated:
    """Mixed into a Llama-style MLP: what ``act_fn(gate) * up`` and ``down_proj`` keep, recomputed in backward
    from gate and up (``GatedDown``: SiLU and a plain or plain-LoRA down projection), or ``act_fn(gate) * up``
    alone recomputed (any other activation, any other down projection)."""

    def product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up  # type: ignore[attr-defined,no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj  # type: ignore[attr-defined]
        if (dtype := self.fused_down(gate)) is not None:
            base, a, b, scale = adapter(down) if isinstance(down, LeanLora) else (down, None, None, 1.0)
            return GatedDown.apply(gate, up, base.weight, base.bias, a, b, scale, dtype)  # type: ignore[no-any-return]
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
        return _compute_dtype(gate, down.weight)


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


def wanted(setting: bool | str, model: torch.nn.Module) -> bool:
    """Whether ``[train] lean_activations`` rewrites ``model``: always with true, never with false, and with "auto"
    where the model has LoRA layers. With a frozen base the rewrites make a step faster as well as leaner (the LoRA
    layers' copies of their input go, and with them their casts). On a full fine-tune there is no such copy, and
    recomputing the norms and products costs 3-7 % of a step (measured: SmolLM2-135M 1.03x, the tiny Llama
    1.07x) for a third less kept for backward: a trade to choose, as gradient checkpointing is."""
    if setting != "auto":
        return bool(setting)
    return any(rewrite(module) in ("lora", "peft") for module in model.modules())


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
