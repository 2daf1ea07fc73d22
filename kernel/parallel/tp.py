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

The ranks of a TP group read the same batch; the data is split over the dp groups only. LoRA follows its base
layer: a column-split projection's ``lora_B`` is split by columns, a row-split one's ``lora_A`` by rows, so that
the adapter's output is laid out like the base layer's. Checkpoints are FSDP2's: whole tensors gathered on
rank 0, spread back on resume.
"""

from __future__ import annotations

from typing import Any

import torch

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
        tp = tp_size(options, options.num_processes * options.nnodes)
        if problems := indivisible("tp_size", tp, options):
            return problems
        if options.nnodes > 1 and options.num_processes % tp:
            return [f"[distributed] tp_size = {tp} would split a layer across machines (num_processes = "
                    f"{options.num_processes} per node): a TP group must stay inside one node; use a divisor of "
                    f"{options.num_processes}"]
        return []

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh

        if self.mesh is None:
            self.mesh = init_device_mesh(device.type, (self.dp_size, self.tp_size), mesh_dim_names=("dp", "tp"))
        split(model, self.mesh["tp"], self.tp_size, self.dp_size)
        return self.shard(model, precision, self.mesh["dp"]) if self.dp_size > 1 else model

    @property
    def head_readable(self) -> bool:
        """Without FSDP2 over dp groups the head is a DTensor of vocabulary rows that losses score as it is
        (``contracts.chunked``: a vocabulary-parallel cross-entropy, no gathered logits)."""
        return self.dp_size == 1

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        return clip_mixed(params, max_norm)


def tp_size(options: Any, world: int) -> int:
    """``[distributed] tp_size``, or every process of a node when it is not set."""
    size = getattr(options, "tp_size", None)
    return int(size) if size else max(1, min(world, getattr(options, "num_processes", world)))


def split(model: torch.nn.Module, mesh: Any, tp: int, dp: int = 1) -> None:
    """Split ``model``'s layers over the ``tp`` ranks of ``mesh`` (``layer_plan``); tied embeddings stay one
    parameter (both uses split by vocabulary rows alike), whose gradient sums both uses."""
    from torch.distributed.tensor.parallel import parallelize_module

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    parallelize_module(model, mesh, layer_plan(model, tp, dp))
    if tied:
        head.weight = embedding.weight


def layer_plan(model: torch.nn.Module, tp: int, dp: int = 1) -> dict[str, Any]:
    """``parallelize_module``'s plan for ``model``: its own ``base_model_tp_plan`` (transformers declares one for
    Llama, Qwen2/3, Mistral, Gemma and others) applied to every projection it names, a LoRA-wrapped one included,
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
        if getattr(module, "base_layer", None) is None:
            plan[name] = parallel()
            continue
        plan[f"{name}.base_layer"] = parallel()
        side = "lora_B" if colwise else "lora_A"
        for adapter in getattr(module, side, {}):
            plan[f"{name}.{side}.{adapter}"] = parallel()
    if not plan:
        raise DistributedError(f"[distributed] backend = 'tp': no module of {type(model).__name__} matches its "
                               f"tensor-parallel plan {sorted(config.base_model_tp_plan)}")
    return plan


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
    """Layers this engine cannot split yet: 4-bit (QLoRA) weights and DoRA's per-column magnitudes."""
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            raise DistributedError(f"[distributed] backend = 'tp': {name} is a bitsandbytes quantised layer, which "
                                   f"cannot be split over ranks; use tuner_strategy = 'lora' (unquantised) under "
                                   f"tp, or backend = 'ddp' for QLoRA")
        if getattr(module, "lora_magnitude_vector", None):
            raise DistributedError(f"[distributed] backend = 'tp': {name} is a DoRA layer, whose magnitudes are "
                                   f"not split yet; use LoRA under tp, or backend = 'fsdp' for DoRA")
