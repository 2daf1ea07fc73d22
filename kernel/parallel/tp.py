"""Tensor parallelism (DTensor): each decoder layer's attention and MLP split over ``tp_size`` ranks, Megatron's
way, and FSDP2 over the ranks that remain (data parallel), the 2-D mesh that stands for "Megatron TP + ZeRO-3".

    mesh (dp, tp), rank = dp_index * tp_size + tp_index: the ranks of a TP group are neighbours (one node)
    q/k/v, gate/up    ColwiseParallel: output features (heads) split, no communication in forward
    o, down           RowwiseParallel: input features split, one all-reduce per projection
    embeddings        split by vocabulary rows: each rank looks up its rows, one all-reduce
    LM head           split by vocabulary rows; the losses score each rank's rows from the hidden states and
                      exchange three numbers per token (vocabulary-parallel cross-entropy, chunked), or,
                      with FSDP2 over dp groups or [train] chunked_loss = false, read logits gathered whole
    the rest          whole on every rank of a TP group (norms); FSDP2 shards it over dp
    sequence_parallel the norms and the residual stream between the projections split by sequence positions
                      (Megatron's sequence parallelism): the row-split projections reduce-scatter their output
                      instead of all-reducing it, attention and the MLP all-gather their input; the activations
                      outside them are held once per TP group

The ranks of a TP group read the same batch; the data is split over the dp groups only. LoRA follows its base
layer: a column-split projection's ``lora_B`` is split by columns, a row-split one's ``lora_A`` by rows, so that
the adapter's output is laid out like the base layer's. QLoRA's 4-bit base layers are split the same ways
(``Quantized``: each rank's rows or columns quantized again, the collectives done by hand). Checkpoints are
FSDP2's: whole tensors gathered on rank 0, spread back on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor.parallel import ParallelStyle

from swiftk.kernel.dist import DistInfo, DistributedError
from swiftk.kernel.parallel.fsdp import FSDP2, clip_mixed
from swiftk.kernel.parallel.none import indivisible

# transformers' tensor-parallel plan words (a model's ``config.base_model_tp_plan`` and ``_tp_plan``) this engine
# applies: projections split by output columns or input rows, the embeddings and the LM head by vocabulary
STYLES = ("colwise", "rowwise", "embedding_rowwise", "colwise_gather_output")


class TensorParallel(FSDP2):
    """``[distributed] backend = "tp"``: ``tp_size`` ranks split every layer; ``world_size / tp_size`` groups of
    them train on different data, their layers sharded with FSDP2 when there are several."""

    name = "tp"

    def __init__(self, info: DistInfo | None = None, options: Any = None) -> None:
        super().__init__(info, options)
        self.tp_size = self.group_size = tp_size(options, self.info.world_size)
        self.dp_size = self.info.world_size // self.tp_size
        self.mesh: Any = None

    @classmethod
    def problems(cls, options: Any) -> list[str]:
        return group_problems(tp_size(options, options.num_processes * options.nnodes), options)

    @classmethod
    def run_problems(cls, cfg: Any) -> list[str]:
        """Tuners whose layers this engine cannot split (``refuse_unsplittable`` checks the model itself too)."""
        train = cfg.train
        if getattr(train, "quantization_bit", None) == 8:
            return ["[train] quantization_bit = 8: bitsandbytes' 8-bit layers cannot be split over ranks under "
                    "backend = 'tp'; use quantization_bit = 4 (tuner_strategy = 'qlora': its NF4 layers split), or "
                    "backend = 'ddp' for an 8-bit base"]
        if getattr(train, "use_dora", False):
            return [f"[train] tuner_strategy = '{train.tuner_strategy}' with DoRA: its magnitude vectors are not "
                    f"split yet under backend = 'tp'; use LoRA or QLoRA under tp, or backend = 'fsdp' for DoRA"]
        return []

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh

        if self.mesh is None:
            self.mesh = init_device_mesh(device.type, (self.dp_size, self.tp_size), mesh_dim_names=("dp", "tp"))
        split(model, self.mesh["tp"], self.tp_size, self.dp_size, bool(getattr(self.options, "sequence_parallel",
                                                                              False)))
        return self.shard(model, precision, self.mesh["dp"]) if self.dp_size > 1 else model

    @property
    def layout(self) -> dict[str, Any]:
        return {"tp_size": self.tp_size}

    @property
    def head_readable(self) -> bool:
        """Without FSDP2 over dp groups the head is a DTensor of vocabulary rows that losses score as it is
        (``contracts.chunked``: a vocabulary-parallel cross-entropy, no gathered logits)."""
        return self.dp_size == 1

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        reduce_partial(params)
        return clip_mixed(params, max_norm)


def tp_size(options: Any, world: int) -> int:
    """``[distributed] tp_size``, or every process of a node when it is not set."""
    size = getattr(options, "tp_size", None)
    return int(size) if size else max(1, min(world, getattr(options, "num_processes", world)))


def group_problems(tp: int, options: Any, what: str = "a layer") -> list[str]:
    """TP groups of ``tp`` ranks that do not divide the processes, or that would span machines (splitting
    ``what``: a layer, a pipeline stage)."""
    if problems := indivisible("tp_size", tp, options):
        return problems
    if options.nnodes > 1 and options.num_processes % tp:
        return [f"[distributed] tp_size = {tp} would split {what} across machines (num_processes = "
                f"{options.num_processes} per node): a TP group must stay inside one node; use a divisor of "
                f"{options.num_processes}"]
    return []


def split(model: torch.nn.Module, mesh: Any, tp: int, dp: int = 1, sequence: bool = False,
          only: set[str] | None = None) -> None:
    """Split ``model``'s layers over the ``tp`` ranks of ``mesh`` (``layer_plan``; ``sequence``: and the
    residual stream by positions, ``sequence_plan``); tied embeddings stay one parameter (both uses split by
    vocabulary rows alike), whose gradient sums both uses. ``only``: the names of the modules to split, and what
    is inside them (a pipeline stage's; the rest of the model is not this rank's)."""
    from torch.distributed.tensor.parallel import parallelize_module

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    plan = layer_plan(model, tp, dp)
    if sequence:
        plan = sequence_plan(model, plan)
    if only is not None:
        plan = {k: v for k, v in plan.items() if any(k == name or k.startswith(f"{name}.") for name in only)}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, mesh, plan)
    for name, param in model.named_parameters():  # SequenceParallel's new parameters would all train
        if name in frozen:
            param.requires_grad_(False)
    if tied:  # whichever use was split (a pipeline's last stage splits the head alone) is both uses' tensor
        embedding.weight = head.weight = head.weight if hasattr(head.weight, "device_mesh") else embedding.weight


def layer_plan(model: torch.nn.Module, tp: int, dp: int = 1) -> dict[str, Any]:
    """``parallelize_module``'s plan for ``model``: its own ``base_model_tp_plan`` (transformers declares one for
    Llama, Qwen2/3, Mistral, Gemma and others) applied to every projection it names, a LoRA-wrapped or 4-bit
    (``Quantized``) one included,
    and its ``_tp_plan``'s vocabulary-parallel embeddings and LM head (under FSDP2 over ``dp`` groups too, when
    their rows divide evenly over the dp x tp ranks: DCP cannot load a checkpoint into uneven 2-D shards; else they
    stay whole); an architecture without a plan, or whose heads do not split ``tp`` ways, is an error naming it."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    config = getattr(model, "config", None)
    if not getattr(config, "base_model_tp_plan", None):
        kind = getattr(config, "model_type", type(model).__name__)
        raise DistributedError(f"[distributed] backend = 'tp': {kind} models declare no tensor-parallel plan "
                               f"(transformers' base_model_tp_plan); use backend = 'fsdp' or 'ddp'")
    check_divisible(config, tp)
    refuse_unsplittable(model)
    plan: dict[str, Any] = {}
    rows = model.get_input_embeddings().weight.shape[0]
    for name, (module, style) in split_modules(model).items():
        if style in ("embedding_rowwise", "colwise_gather_output"):  # by vocabulary (an adapted one stays whole)
            if getattr(module, "base_layer", None) is None and (dp == 1 or rows % (dp * tp) == 0):
                plan[name] = RowwiseParallel(input_layouts=Replicate()) if style == "embedding_rowwise" else \
                    ColwiseParallel(output_layouts=Replicate())
            continue
        colwise = style == "colwise"
        parallel = ColwiseParallel if colwise else RowwiseParallel
        base = getattr(module, "base_layer", None)
        if base is None:
            plan[name] = Quantized(colwise) if quantized(module) else parallel()
            continue
        plan[f"{name}.base_layer"] = Quantized(colwise) if quantized(base) else parallel()
        side = "lora_B" if colwise else "lora_A"
        for adapter in getattr(module, side, {}):
            plan[f"{name}.{side}.{adapter}"] = parallel()
    if not plan:
        raise DistributedError(f"[distributed] backend = 'tp': no module of {type(model).__name__} matches its "
                               f"tensor-parallel plan {sorted(config.base_model_tp_plan)}")
    return plan


def sequence_plan(model: torch.nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """``plan`` with Megatron's sequence parallelism: each decoder layer's norms run on this rank's share of the
    sequence positions (``SequenceParallel``), attention and the MLP gather the positions first, and their
    row-split output projections reduce-scatter to positions (a LoRA adapter beside them all-reduces its rank-r
    product and cuts B's output to the same positions); the first layer cuts its input, the final norm runs split
    and the head gathers the positions back. For decoder layers made of ``input_layernorm``, ``self_attn``,
    ``post_attention_layernorm`` and ``mlp`` alone (Llama, Qwen2/3, Mistral); another is an error naming it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        SequenceParallel,
    )

    from swiftk.kernel.parallel.fsdp import decoder_layers

    names = {id(module): name for name, module in model.named_modules()}
    layers = decoder_layers(model)
    parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

    def unlike(layer: torch.nn.Module) -> bool:  # a part missing, or a norm of its own more (Gemma2's four)
        norms = {n for n, c in layer.named_children() if "norm" in type(c).__name__.lower()}
        return not all(hasattr(layer, part) for part in parts) or not norms <= set(parts)

    odd = next((layer for layer in layers if unlike(layer)), None)
    decoder = model.get_base_model().get_decoder() if hasattr(model, "get_base_model") else model.get_decoder()
    if odd is not None or not hasattr(decoder, "norm"):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        what = f"decoder layers ({type(odd).__name__}) are" if odd is not None else "decoder has no final norm, or is"
        raise DistributedError(f"[distributed] sequence_parallel: {kind} {what} not made of {', '.join(parts)} "
                               f"alone, the layout it splits; set sequence_parallel = false")
    positions, whole = Shard(1), Replicate()
    out = dict(plan)
    for name, style in plan.items():  # row-split projections leave the positions split
        if isinstance(style, Quantized) and not style.colwise:
            out[name] = Quantized(False, positions)
        if type(style).__name__ != "RowwiseParallel" or "embed" in name:
            continue
        if ".lora_A." in name:  # the adapter's small product stays whole (all-reduced); B's output is cut to match
            out[name.replace(".lora_A.", ".lora_B.")] = PrepareModuleOutput(
                output_layouts=(whole,), desired_output_layouts=(positions,), use_local_output=False)
        else:
            out[name] = type(style)(output_layouts=positions, use_local_output=False)
    for index, layer in enumerate(layers):
        at = names[id(layer)]
        if index == 0:
            out[at] = PrepareModuleInput(input_layouts=(whole,), desired_input_layouts=(positions,),
                                         use_local_output=False)
        out[f"{at}.input_layernorm"] = out[f"{at}.post_attention_layernorm"] = SequenceParallel()
        # local tensors inside: the projections (and LoRA's whole matrices) see what they see without it
        out[f"{at}.self_attn"] = PrepareModuleInput(input_kwarg_layouts={"hidden_states": positions},
                                                    desired_input_kwarg_layouts={"hidden_states": whole},
                                                    use_local_output=True)
        out[f"{at}.mlp"] = PrepareModuleInput(input_layouts=(positions,), desired_input_layouts=(whole,),
                                              use_local_output=True)
    out[names[id(decoder.norm)]] = SequenceParallel()
    head = names[id(model.get_output_embeddings())]
    if head in out:  # split by vocabulary: it gathers the positions, then the logits
        out[head] = ColwiseParallel(input_layouts=positions, output_layouts=whole)
    else:
        out[head] = PrepareModuleInput(input_layouts=(positions,), desired_input_layouts=(whole,),
                                       use_local_output=True)
    return out


def reduce_partial(params: list[torch.nn.Parameter]) -> None:
    """Gradients still partial sums over the TP group (sequence parallelism's norms: each rank saw its positions)
    summed now, once, before the norm and the optimizer read them."""
    from torch.distributed.tensor import DTensor, Replicate

    for param in params:
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            param.grad = grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])


def split_modules(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """The modules the model's plans split, by name, with their style (``STYLES``)."""
    import fnmatch

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    declared = {**dict(getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {}),
                **dict(getattr(causal, "_tp_plan", None) or {})}
    patterns = {f"*{pattern}": style for pattern, style in declared.items() if style in STYLES}
    found = {}
    for name, module in model.named_modules():
        style = next((s for p, s in patterns.items() if fnmatch.fnmatchcase(name, p)), None)
        if name and style is not None:
            found[name] = (module, style)
    return found


def check_divisible(config: Any, tp: int) -> None:
    """Heads, key-value heads and the MLP's width must split evenly over the TP group."""
    sizes = {"num_attention_heads": getattr(config, "num_attention_heads", None),
             "num_key_value_heads": getattr(config, "num_key_value_heads", None),
             "intermediate_size": getattr(config, "intermediate_size", None)}
    bad = [f"{key} = {value}" for key, value in sizes.items() if isinstance(value, int) and value % tp]
    if bad:
        raise DistributedError(f"[distributed] tp_size = {tp} does not divide the model's {' and '.join(bad)}: "
                               f"each rank holds an equal part of every layer; choose a tp_size that divides them")


def refuse_unsplittable(model: torch.nn.Module) -> None:
    """Layers this engine cannot split yet: 8-bit weights and DoRA's per-column magnitudes."""
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            raise DistributedError(f"[distributed] backend = 'tp': {name} is a bitsandbytes 8-bit layer, which "
                                   f"cannot be split over ranks; use quantization_bit = 4 (QLoRA's NF4 layers "
                                   f"split), or backend = 'ddp' for an 8-bit base")
        if getattr(module, "lora_magnitude_vector", None):
            raise DistributedError(f"[distributed] backend = 'tp': {name} is a DoRA layer, whose magnitudes are "
                                   f"not split yet; use LoRA under tp, or backend = 'fsdp' for DoRA")


def quantized(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


class Quantized(ParallelStyle):
    """A bitsandbytes 4-bit layer (QLoRA's frozen base) split like ``ColwiseParallel`` (``colwise``: by output
    features) or ``RowwiseParallel`` (by input features). A DTensor cannot hold packed 4-bit codes, so the layer keeps
    plain tensors: this rank's rows or columns of its dequantized weight, quantized again with the same type and
    block size, the blocks' scales kept in float32 rather than quantized once more (then each block whose columns
    stay on one rank holds the very codes and scales it held whole: the split layer computes the whole one's
    numbers). The collectives are this style's: a column split sums its input's gradient over the group (each rank's
    rows saw the input), a row split sums its output over the group (its bias added on one rank), or reduce-scatters
    it to sequence positions (``positions``: sequence parallelism, a DTensor out as ``RowwiseParallel`` gives)."""

    def __init__(self, colwise: bool, positions: Any = None) -> None:
        super().__init__()
        self.colwise, self.positions = colwise, positions

    def _apply(self, module: torch.nn.Module, device_mesh: Any) -> torch.nn.Module:
        import bitsandbytes as bnb

        weight = module.weight
        whole = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        rank, size = device_mesh.get_local_rank(), device_mesh.size()
        piece = whole.chunk(size, dim=0 if self.colwise else 1)[rank].contiguous()
        module.weight = bnb.nn.Params4bit(piece, requires_grad=False, blocksize=weight.blocksize,
                                          compress_statistics=False, quant_type=weight.quant_type,
                                          quant_storage=weight.quant_storage, module=module)._quantize(piece.device)
        module.out_features, module.in_features = piece.shape
        if module.bias is not None and self.colwise:
            module.bias = torch.nn.Parameter(module.bias.detach().chunk(size)[rank].clone(), requires_grad=False)
        elif module.bias is not None and rank:
            module.bias.data.zero_()  # the output is summed over the group: the bias counts once
        group = device_mesh.get_group()
        if self.colwise:
            module.register_forward_pre_hook(lambda _m, args: (SumGradient.apply(args[0], group), *args[1:]))
        else:
            module.register_forward_hook(lambda _m, _a, out: self.summed(out, device_mesh))
        return module

    def summed(self, partial: torch.Tensor, mesh: Any) -> torch.Tensor:
        """This rank's partial output summed over the group: whole on every rank, or split by positions."""
        from torch.distributed.tensor import DTensor, Partial, Replicate

        summed = DTensor.from_local(partial, mesh, [Partial()], run_check=False)
        if self.positions is not None:
            return summed.redistribute(mesh, [self.positions])
        return summed.redistribute(mesh, [Replicate()]).to_local()


class SumGradient(torch.autograd.Function):
    """The identity, whose gradient is summed over ``group``: a column-split layer's input is used by every rank's
    rows, each of which gives only its share of the input's gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
