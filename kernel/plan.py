"""``swiftk plan``: the memory a config needs on each GPU, before anything is loaded, for the layout it asks for and
for every layout swiftk can run on the GPUs named (``--gpus 8xA10``).

    weights      every parameter in the dtype it is stored in: trainable ones in float32 (the tuners keep float32
                 master weights), frozen ones in [model] dtype, QLoRA's linear layers in 4 bits (+ their scales)
    gradients    float32, one per trainable parameter (DDP adds its buckets; none held in backward with
                 [train] optimizer_in_backward)
    optimizer    by [train] optimizer: AdamW 8 bytes per trainable parameter, adamw_8bit 2, Adafactor the factored
                 moments, GaLore its projected moments and projections
    activations  what autograd saves for backward, counted from a forward of the model on the meta device (shapes,
                 no memory) at [train] batch_size x [data] max_length, so every architecture is counted as it
                 computes; with gradient checkpointing, each layer's input plus one layer recomputed
    logits       the LM head's output, its float32 copy and its gradient; with the chunked loss, one chunk's
    runtime      the CUDA context and libraries' workspaces (1 GiB, measured on an H100 with torch 2.13); on CPU,
                 this process's resident set once torch and transformers are imported

Layouts divide these as their engines do: ZeRO-2 shards gradients and optimizer state, FSDP2 (ZeRO-3) all three
plus a gathered layer, tensor parallelism the split projections (``kernel.parallel.tp``), pipeline parallelism
gives each stage its layers (split as ``kernel.parallel.pp`` splits them) and the activations of the micro-batches
its schedule keeps in flight, ``device_map`` spreads the layers over the GPUs of one process. The figure is the
peak a step reaches, counted as if activations and all gradients were alive at once (an upper bound by the
activations freed while gradients appear), and the micro-batch at full length (shorter batches need less).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from swiftk.kernel.errors import SwiftkError

GIB = 2**30
CUDA_RUNTIME = 1.0 * GIB
# GPU memory in GiB as the cards are sold, and whether they compute bfloat16 natively
GPUS: dict[str, tuple[float, bool]] = {
    "t4": (16, False), "v100": (32, False), "v100-16": (16, False), "a10": (24, True), "a10g": (24, True),
    "l4": (24, True), "rtx3090": (24, True), "rtx4090": (24, True), "a6000": (48, True), "l40s": (48, True),
    "a100": (80, True), "a100-40": (40, True), "a100-80": (80, True), "h100": (80, True), "h200": (141, True),
    "b200": (192, True),
}
QUANTIZED_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.0 + 4 / 4096}  # NF4 with double-quantised scales; int8 rows
SCALE_BYTES = {bits: size - bits / 8 for bits, size in QUANTIZED_BYTES.items()}  # the scales' part of those
SPLIT_SCALE_BYTES = 4 / 64  # a tp-split NF4 layer's scales: float32, one per block of 64 (kernel.parallel.tp.Quantized)
REFUSED_UNDER_TP = ("dora",)


class PlanError(SwiftkError):
    """The plan cannot be made: an unknown GPU, a model whose shape cannot be read."""


@dataclass(frozen=True)
class Gpus:
    count: int
    name: str
    gib: float
    bf16: bool

    @classmethod
    def parse(cls, text: str) -> Gpus:
        """``8xA10``, ``2xH100``, ``4x24GB`` (any card with that memory, bf16 assumed), ``cpu``."""
        text = text.strip().lower()
        if text == "cpu":
            import psutil

            return cls(1, "cpu", psutil.virtual_memory().total / GIB, False)
        memory = re.fullmatch(r"(?:(\d+)\s*[x*]\s*)?(\d+(?:\.\d+)?)\s*gi?b", text)
        if memory:
            return cls(int(memory[1] or 1), f"{memory[2]} GiB", float(memory[2]), True)
        found = re.fullmatch(r"(?:(\d+)\s*[x*]\s*)?([a-z][a-z0-9-]*)", text)
        if not found:
            raise PlanError(f"--gpus {text!r}: write COUNTxNAME, e.g. 8xA10, 2xH100 or 4x24GB")
        count, key = int(found[1] or 1), found[2]
        if key not in GPUS:
            raise PlanError(f"--gpus {text!r}: unknown GPU '{key}'; known: {', '.join(GPUS)}, or give the memory "
                            f"(e.g. 8x24GB)")
        gib, bf16 = GPUS[key]
        return cls(count, key.upper(), gib, bf16)


@dataclass(frozen=True)
class Layout:
    """How the ranks share the model: ``dp`` groups reading different data, ``tp`` ranks splitting each layer."""

    name: str
    gpus: int
    dp: int = 1
    tp: int = 1
    pp: int = 1  # pipeline stages
    schedule: str = "1f1b"  # the pipeline's: "1f1b", "gpipe", "interleaved_1f1b" or "zero_bubble"
    virtual: int = 1  # stages per rank (the interleaved schedules')
    sequence: bool = False  # tp with sequence parallelism: what a layer keeps whole is split by positions too
    micro: int = 1  # micro-batches a step (grad_accum): a pipeline keeps up to this many in flight
    shard: str = "none"  # "none", "zero2" (gradients, optimizer state), "zero3" (and the weights)
    spread: bool = False  # device_map: one process, its layers over the GPUs
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class Memory:
    """Bytes per GPU (the busiest one)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    runtime: float
    load: float = 0.0  # while the model loads, before the engine splits it (not part of ``total``: it comes first)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.runtime

    @property
    def peak(self) -> float:
        return max(self.total, self.load)

    def as_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in {**dataclasses.asdict(self), "total": self.total}.items()}


@dataclass
class Model:
    """What the plan knows of the tuned model, counted on the meta device."""

    description: str
    params: int
    trainable: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    largest_layer: int  # parameters of the largest decoder layer
    weight_bytes: float  # every parameter as stored
    split_share: float  # the share of weight bytes in projections tensor parallelism splits
    optimizer_bytes: float
    act_layer: list[tuple[float, float]]  # per decoder layer: (bytes kept whole, bytes split by tp) per micro-batch
    act_other: float  # saved outside the layers (embeddings, final norm) per micro-batch
    layer_input: float  # one layer's input (what a checkpointed layer keeps)
    quantized: int = 0  # parameters stored in 4 or 8 bits
    split_quantized: int = 0  # those of them in projections tensor parallelism splits
    bits: int = 4  # how many bits the quantized ones take
    # what a pipeline stage can hold, in order: the embeddings, each decoder layer, the final norm and the head
    # (a tied head counted again: the last stage holds a copy), as (parameters, bytes as stored, trainable)
    units: list[tuple[int, float, int]] = dataclasses.field(default_factory=list)
    pipelined: bool = False  # the architecture splits into pipeline stages (kernel.parallel.pp)


def hf_config(model_cfg: Any) -> Any:
    """The transformers config of ``[model]`` without its weights: ``architecture`` for a random init, else the
    folder's (or GGUF file's) config."""
    from transformers import AutoConfig

    from swiftk.kernel.model import check_source, random_config, resolve_source

    if model_cfg.init == "random":
        return random_config(model_cfg)
    source = resolve_source(model_cfg.model_id)
    check_source(model_cfg.model_id, source, model_cfg.gguf_file)
    try:
        return AutoConfig.from_pretrained(source, gguf_file=model_cfg.gguf_file,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read the model's config from '{source}': {str(exc).splitlines()[0]}") from None


def measure(cfg: Any, config: Any, storage: torch.dtype, rows: int) -> Model:
    """Build the tuned model on the meta device, count its parameters and run one forward to see what autograd
    saves, layer by layer."""
    from transformers import AutoModelForCausalLM

    from swiftk.kernel.tuners import apply_tuner

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=storage, attn_implementation=register_attention())
    train = cfg.train.model_copy(update={"gradient_checkpointing": False})
    tuner = cfg.train.tuner_strategy
    if tuner == "qlora":  # the 4-bit layers are counted below; the adapters are LoRA's
        train = train.model_copy(update={"tuner_strategy": "lora"})
    tuned = apply_tuner(model, train)
    layers = decoder_layers(tuned)
    quantized = quantized_names(tuned) if tuner == "qlora" else set()
    bits = getattr(cfg.train, "quantization_bit", None) or 4
    split = split_names(tuned)
    weight_bytes = split_bytes = 0.0
    trainable = total = 0
    owner = {id(p): i + 1 for i, layer in enumerate(layers) for p in layer.parameters()}
    embedding = tuned.get_input_embeddings()
    owner.update({id(p): 0 for p in embedding.parameters()})
    units = [[0, 0.0, 0] for _ in range(len(layers) + 2)]
    for name, param in tuned.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            size = param.numel() * 4.0
        elif name in quantized:
            size = param.numel() * QUANTIZED_BYTES[bits]
        else:
            size = param.numel() * param.element_size()
        weight_bytes += size
        if any(name.startswith(prefix) for prefix in split):
            split_bytes += size
        unit = units[owner.get(id(param), len(layers) + 1)]  # the final norm, the head: the last stage's
        unit[0], unit[1], unit[2] = unit[0] + param.numel(), unit[1] + size, unit[2] + param.numel() * \
            param.requires_grad
    if tuned.get_output_embeddings().weight is embedding.weight:  # tied: the last stage holds a copy
        units[-1] = [units[-1][0] + units[0][0], units[-1][1] + units[0][1], units[-1][2] + units[0][2]]
    act_layer, act_other, layer_input = activations(tuned, layers, config, rows, cfg.data.max_length)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model = Model(
        description=f"{type(tuned.get_base_model() if hasattr(tuned, 'get_base_model') else tuned).__name__}",
        params=total, trainable=trainable, layers=len(layers),
        heads=getattr(text, "num_attention_heads", 0) or 0,
        kv_heads=getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 0) or 0,
        intermediate=getattr(text, "intermediate_size", 0) or 0, vocab=getattr(text, "vocab_size", 0) or 0,
        largest_layer=max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0),
        weight_bytes=weight_bytes, split_share=split_bytes / weight_bytes if weight_bytes else 0.0,
        optimizer_bytes=optimizer_bytes(tuned, cfg.train), act_layer=act_layer, act_other=act_other,
        layer_input=layer_input, quantized=sum(p.numel() for n, p in tuned.named_parameters() if n in quantized),
        split_quantized=sum(p.numel() for n, p in tuned.named_parameters()
                            if n in quantized and any(n.startswith(prefix) for prefix in split)), bits=bits,
        units=[(int(a), float(b), int(c)) for a, b, c in units], pipelined=pipelined(tuned, layers))
    return model


def pipelined(model: torch.nn.Module, layers: list[torch.nn.Module]) -> bool:
    """Whether ``kernel.parallel.pp`` splits this model into stages."""
    from swiftk.kernel.dist import DistributedError
    from swiftk.kernel.parallel.pp import parts

    try:
        parts(model)
    except DistributedError:
        return False
    return bool(layers)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (as FSDP2 shards them); none for a model that marks none."""
    from swiftk.kernel.dist import DistributedError
    from swiftk.kernel.parallel.fsdp import decoder_layers as blocks

    try:
        return blocks(model)
    except DistributedError:
        return []


def quantized_names(model: torch.nn.Module) -> set[str]:
    """The weights bitsandbytes would quantise: every linear layer's but the LM head's (QLoRA's default)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name:
            names.add(f"{name}.weight")
    return names


def split_names(model: torch.nn.Module) -> list[str]:
    """Module name prefixes tensor parallelism splits (those ``kernel.parallel.tp`` plans)."""
    from swiftk.kernel.parallel.tp import split_modules

    return [f"{name}." for name in split_modules(model)]


def optimizer_bytes(model: torch.nn.Module, train: Any) -> float:
    """The optimizer state of the trainable parameters, by ``[train] optimizer``."""
    import inspect

    from swiftk.plugins.optimizers.galore import galore_adamw, is_target
    from swiftk.plugins.optimizers.projected_adamw import native_projected_adamw
    from swiftk.plugins.tuners.full import galore_optimizer

    name, arguments = galore_optimizer(train) if train.tuner_strategy == "galore" else \
        (train.optimizer, train.optimizer_config)
    projecting = {"galore_adamw": galore_adamw, "native_projected_adamw": native_projected_adamw}.get(name)
    galore = projecting is not None
    if galore:  # the optimizer's own defaults under what the config sets
        defaults = {k: v.default for k, v in inspect.signature(projecting).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        arguments = {**defaults, **arguments}
    rank = int(arguments.get("rank", 0))
    targets = arguments.get("target_modules", ())
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    total = 0.0
    for pname, param in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
        n = param.numel()
        if galore and is_target(pname, param, targets):
            big, small = max(param.shape), min(param.shape)
            r = min(rank, small)
            total += 8.0 * r * big + 4.0 * r * small  # two moments in the projected space, the projection
        elif name == "adamw_8bit":
            total += 2.0 * n
        elif name == "adafactor":
            total += 4.0 * (sum(param.shape[-2:]) if param.dim() >= 2 else n)
        elif name == "sgd":
            total += 4.0 * n if train.optimizer_config.get("momentum") else 0.0
        else:  # adamw, native_adamw, and plugins' optimizers, counted as AdamW
            total += 8.0 * n
    return total


def activations(model: torch.nn.Module, layers: list[torch.nn.Module], config: Any, rows: int,
                tokens: int) -> tuple[list[tuple[float, float]], float, float]:
    """Bytes autograd saves during one forward of ``rows x tokens`` on the meta device: per decoder layer (kept
    whole across a TP group, split by it), outside the layers, and one layer's input. A saved tensor whose last
    dimension is the hidden size is kept whole under tensor parallelism; heads and the MLP's width are split."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    params = {p.untyped_storage()._cdata for p in model.parameters()}  # weights (and their transposes) are not saved
    seen: set[int] = set()
    alive: list[torch.Tensor] = []  # held until the end, so that storages are not reused and counted twice
    saved = [0.0, 0.0]  # bytes kept whole under tp, bytes split by it
    marks: list[tuple[float, float]] = []
    inputs: list[float] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if tensor.is_floating_point() and storage._cdata not in params and storage._cdata not in seen:
            seen.add(storage._cdata)
            alive.append(tensor)
            saved[0 if tensor.dim() and tensor.shape[-1] == hidden else 1] += float(storage.nbytes())
        return tensor

    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        marks.append((saved[0], saved[1]))
        inputs.append(first_tensor_bytes(args, kwargs))

    def after(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        marks.append((saved[0], saved[1]))

    hooks = []
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(layer.register_forward_hook(after))
    ids = torch.zeros(rows, tokens, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, logits_to_keep=torch.empty(0, dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    pairs = zip(marks[::2], marks[1::2], strict=True)
    per_layer = [(after[0] - before[0], after[1] - before[1]) for before, after in pairs]
    other = sum(saved) - sum(w + s for w, s in per_layer)
    return per_layer, other, max(inputs, default=0.0)


class FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (FlashAttention, PyTorch's flash and memory-efficient SDPA, the CPU flash
    kernel) keeps for backward: queries, keys, values, the output and one float32 log-sum-exp per query and head.
    The meta device would otherwise run SDPA's math path, which keeps the whole [heads, T, T] score matrix."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, key, value = ctx.saved_tensors[:3]
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def fused_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: [B, H, T, D] in, [B, T, H, D] out."""
    return FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """The name ``fused_attention`` is registered under in transformers (with no mask: it needs none)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PLAN_ATTENTION, fused_attention)
    AttentionMaskInterface.register(PLAN_ATTENTION, lambda *args, **kwargs: None)
    return PLAN_ATTENTION


PLAN_ATTENTION = "swiftk_plan"


def first_tensor_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return float(value.numel() * value.element_size())
    return 0.0


# ------------------------------------------------------------------------------------------ layouts


def layout_of(cfg: Any) -> Layout:
    """The layout the config asks for ([device] written onto [distributed] first)."""
    from swiftk.kernel.parallel.config import apply_device

    apply_device(cfg)
    d = cfg.distributed
    n = d.num_processes * d.nnodes
    if n == 1:
        spread = cfg.model.device_map is not None
        return Layout("device_map" if spread else "single", 1, spread=spread)
    if d.backend == "tp":
        tp = d.tp_size or d.num_processes
        return Layout(mesh_name(n // tp, 1, tp), n, dp=n // tp, tp=tp, shard="zero3" if n > tp else "none",
                      sequence=d.sequence_parallel)
    if d.backend == "pp":
        from swiftk.kernel.parallel.pp import stages_per_rank, tp_size

        tp = tp_size(d)
        pp = d.pp_size or n // tp
        return Layout(mesh_name(n // (pp * tp), pp, tp), n, dp=n // (pp * tp), pp=pp, tp=tp,
                      schedule=d.pp_schedule, micro=cfg.train.grad_accum, shard="zero3" if n > pp * tp else "none",
                      virtual=stages_per_rank(d))
    if d.backend == "fsdp":
        return Layout("fsdp", n, dp=n, shard="zero3")
    if d.backend == "deepspeed":
        stage = d.zero_stage or 2
        return Layout(f"zero{stage}", n, dp=n, shard=f"zero{stage}", offload_optimizer=d.offload_optimizer,
                      offload_param=d.offload_param)
    return Layout("ddp", n, dp=n)


def candidates(gpus: int, model: Model, tuner: str, micro: int = 1) -> list[Layout]:
    """Every layout swiftk runs on ``gpus`` GPUs for this model and tuner (a pipeline with at least as many
    micro-batches a step as stages, ``grad_accum`` raised where it has fewer)."""
    if gpus == 1:
        return [Layout("single", 1)]
    found = [Layout("ddp", gpus, dp=gpus), Layout("zero2", gpus, dp=gpus, shard="zero2"),
             Layout("fsdp", gpus, dp=gpus, shard="zero3")]
    stages = range(2, min(gpus, model.layers) + 1) if model.pipelined else range(0)  # pp: every tuner
    for pp in (1, *stages):  # pp 1: tp and dp x tp; else a pipeline, each stage split by tp too (3-D meshes)
        for tp in range(2 if pp == 1 else 1, gpus // pp + 1):
            if gpus % (pp * tp) or (tp > 1 and (tuner in REFUSED_UNDER_TP or not splits(model, tp))):
                continue
            dp = gpus // (pp * tp)
            found.append(Layout(mesh_name(dp, pp, tp), gpus, dp=dp, pp=pp, tp=tp, micro=max(micro, pp) if pp > 1
                                else 1, shard="zero3" if dp > 1 else "none"))
    found.append(Layout("device_map", gpus, spread=True))
    return found


def mesh_name(dp: int, pp: int, tp: int) -> str:
    """"tp8", "dp2xtp4", "pp4", "dp2xpp4", "pp2xtp4", "dp2xpp2xtp2"."""
    return "x".join(f"{kind}{size}" for kind, size in (("dp", dp), ("pp", pp), ("tp", tp)) if size > 1)


def splits(model: Model, tp: int) -> bool:
    return model.split_share > 0 and all(v % tp == 0 for v in (model.heads, model.kv_heads, model.intermediate) if v)


def per_gpu(model: Model, layout: Layout, cfg: Any, runtime: float, chunk_bytes: float) -> Memory:
    """``model``'s memory on the busiest GPU of ``layout``."""
    if layout.pp > 1:
        return max((stage_memory(model, layout, cfg, runtime, chunk_bytes, stage) for stage in range(layout.pp)),
                   key=lambda memory: memory.total)
    weights, optimizer = model.weight_bytes, model.optimizer_bytes
    gradients = 4.0 * model.trainable
    trainable_share = 4.0 * model.trainable / weights if weights else 0.0
    largest = max((u[1] for u in model.units[1:-1]), default=4.0 * model.largest_layer)  # a layer as stored
    if layout.tp > 1:  # the split projections' part of each figure, over tp
        keep = 1 - model.split_share * (1 - 1 / layout.tp)
        weights, gradients, optimizer = weights * keep, gradients * keep, optimizer * keep
        largest /= layout.tp
    shards = layout.dp if layout.shard != "none" else 1
    if layout.shard == "zero3":
        weights = weights / shards + 2 * largest  # the gathered layer and the next one, prefetched
        gradients = gradients / shards + largest * min(1.0, trainable_share)
    elif layout.shard == "zero2":
        gradients /= shards
    optimizer /= shards
    if layout.shard == "none" and layout.dp > 1 and not layout.spread:
        gradients *= 2  # DDP's buckets hold a second copy
    if cfg.train.optimizer_in_backward:
        gradients = 4.0 * model.largest_layer / max(layout.tp, 1) if model.trainable else 0.0
    weights += scales_beyond(model, layout, shards if layout.shard == "zero3" else 1)
    if layout.offload_optimizer:
        optimizer = 0.0
    if layout.offload_param:
        weights = 2 * largest
    act = activation_bytes(model, layout, cfg.train.gradient_checkpointing)
    logits = logit_bytes(model, cfg, layout, chunk_bytes)
    if layout.spread:
        weights, gradients, optimizer, act = (x / layout.gpus for x in (weights, gradients, optimizer, act))
    return Memory(weights, gradients, optimizer, act, logits, runtime, loading(model, layout, runtime))


def loading(model: Model, layout: Layout, runtime: float) -> float:
    """Every rank loads the whole model onto its device before its engine splits or shards it (a pipeline stage, a
    TP share, an FSDP2 shard); only ``device_map`` loads each GPU's layers alone."""
    return model.weight_bytes / (layout.gpus if layout.spread else 1) + runtime


def scales_beyond(model: Model, layout: Layout, shards: int) -> float:
    """The quantized layers' scales past what ``weights`` counts for them (as stored, split and sharded like the
    rest): they are bitsandbytes attributes of the layer, which FSDP2 does not shard, and a tp-split NF4 layer keeps
    them in float32 rather than quantized again."""
    if not model.quantized:
        return 0.0
    nested = SCALE_BYTES[model.bits]
    whole, split = model.quantized - model.split_quantized, model.split_quantized
    counted = (whole * nested + split * nested / layout.tp) / shards
    held = whole * nested + split * (SPLIT_SCALE_BYTES if layout.tp > 1 else nested) / layout.tp
    return held - counted


def stage_memory(model: Model, layout: Layout, cfg: Any, runtime: float, chunk_bytes: float, stage: int) -> Memory:
    """Pipeline rank ``stage``'s memory: its units' weights, gradients and optimizer state (sharded over the
    pipelines with FSDP2 when there are several), the activations of its layers for each micro-batch in flight
    (1F1B: up to ``pp - stage``; GPipe: all of them; interleaved, with v stages per rank: up to ``2 (pp - stage -
    1) + (v - 1) pp + 1`` stage-micro-batches, each 1/v of the rank's layers, Megatron's count), and on the last
    stage the logits (1F1B scores one micro-batch at a time; GPipe keeps every micro-batch's for backward)."""
    from swiftk.kernel.parallel.pp import layer_costs_of, stage_bounds

    layers = model.units[1:-1]
    balance = getattr(cfg.distributed, "pp_balance", "memory") if cfg.distributed.backend == "pp" else "memory"
    costs = layer_costs_of([u[1] for u in layers], model.units[0][1], model.units[-1][1], balance)
    bounds = stage_bounds(costs, layout.pp * layout.virtual)
    first, last = stage == 0, stage == layout.pp - 1
    mine = [i for k in range(layout.virtual) for i in range(bounds[stage + k * layout.pp],
                                                            bounds[stage + k * layout.pp + 1])]
    held = [model.units[1 + i] for i in mine]
    held += [model.units[0]] if first else []
    held += [model.units[-1]] if last else []
    weights = sum(u[1] for u in held)
    trainable = sum(u[2] for u in held)
    gradients = 4.0 * trainable
    optimizer = model.optimizer_bytes * trainable / model.trainable if model.trainable else 0.0
    keep = 1 - model.split_share * (1 - 1 / layout.tp)  # tp inside the stage: its projections' share over tp
    weights, gradients, optimizer = weights * keep, gradients * keep, optimizer * keep
    if layout.dp > 1:  # FSDP2 across the pipelines: a layer gathered at a time (and the next, prefetched)
        largest = max((u[1] for u in held), default=0.0) * keep
        weights = weights / layout.dp + 2 * largest
        gradients = gradients / layout.dp + min(largest, gradients)
        optimizer /= layout.dp
    in_flight = layout.micro if layout.schedule == "gpipe" else min(layout.micro, layout.pp - stage)
    if layout.virtual > 1:  # in units of the rank's whole set of layers
        v = layout.virtual
        in_flight = min(layout.micro * v, 2 * (layout.pp - stage - 1) + (v - 1) * layout.pp + 1) / v
    per_layer = [whole + split / layout.tp for i, (whole, split) in enumerate(model.act_layer) if i in mine]
    if cfg.train.gradient_checkpointing and per_layer:
        act = in_flight * model.layer_input * len(per_layer) + max(per_layer)
    else:
        act = in_flight * sum(per_layer)
    act += in_flight * model.act_other if last else 0.0
    logits = logit_bytes(model, cfg, layout, chunk_bytes) * (layout.micro if layout.schedule == "gpipe" else 1) \
        if last else 0.0
    weights += scales_beyond(model, layout, layout.dp) * sum(u[0] for u in held) / max(1, model.params)  # its share
    return Memory(weights, gradients, optimizer, act, logits, runtime, loading(model, layout, runtime))


def activation_bytes(model: Model, layout: Layout, checkpointing: bool) -> float:
    """A micro-batch's activations on one rank: tp splits the attention's and MLP's, sequence parallelism the rest
    of each layer's (norms, residual stream) and the layer inputs checkpointing keeps."""
    split_whole = layout.tp if layout.sequence else 1
    per_layer = [whole / split_whole + split / layout.tp for whole, split in model.act_layer]
    if not per_layer:
        return model.act_other
    if checkpointing:
        return model.layer_input / split_whole * len(per_layer) + max(per_layer) + model.act_other
    return sum(per_layer) + model.act_other


def logit_bytes(model: Model, cfg: Any, layout: Layout, chunk_bytes: float) -> float:
    """The LM head's output: whole logits (compute dtype, a float32 copy in the loss, its gradient) unless the
    chunked loss runs: one chunk's logits on each rank (not with sharded parameters, FSDP2 or ZeRO-3, nor in a
    pipeline; under tensor parallelism without dp groups, a chunk of each rank's vocabulary rows)."""
    chunked = (cfg.train.chunked_loss and layout.shard != "zero3" and layout.pp == 1
               and (layout.tp == 1 or layout.dp == 1))
    if chunked:
        return chunk_bytes
    rows = rows_per_micro_batch(cfg)
    compute = 2 if cfg.train.precision == "bf16" else 4
    return float(rows * cfg.data.max_length * model.vocab * (compute + 4 + 4))


def rows_per_micro_batch(cfg: Any) -> int:
    """Sequences in one micro-batch: preference stages score two per pair, online RL ``num_generations`` per
    prompt."""
    from swiftk.kernel.plugins import stage_class

    stage = stage_class(cfg.train)
    per_item = 2 if stage.unit == "pairs" else int(getattr(cfg.train, "num_generations", 1) or 1)
    return int(cfg.train.batch_size) * per_item


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    model: Model
    asked: Layout
    asked_memory: Memory
    gpus: Gpus | None
    options: list[tuple[Layout, Memory]]
    tuner: str
    rows: int
    tokens: int

    def best(self) -> tuple[Layout, Memory] | None:
        """The fitting layout with the least memory per GPU."""
        fits = [(layout, memory) for layout, memory in self.options if self.fits(memory)]
        return min(fits, key=lambda item: item[1].total) if fits else None

    def fits(self, memory: Memory) -> bool:
        """Trained and loaded: the whole model's load comes first on every engine but device_map."""
        return bool(self.gpus and memory.peak <= self.gpus.gib * GIB)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v for k, v in dataclasses.asdict(self.model).items() if k != "act_layer"},
            "tuner": self.tuner, "micro_batch": {"rows": self.rows, "tokens": self.tokens},
            "asked": {"layout": dataclasses.asdict(self.asked), "per_gpu_gib": self.asked_memory.as_gib()},
            "gpus": dataclasses.asdict(self.gpus) if self.gpus else None,
            "options": [{"layout": layout.name, "per_gpu_gib": memory.as_gib(), "fits": self.fits(memory)}
                        for layout, memory in self.options],
            "best": best[0].name if (best := self.best()) else None,
        }


def make_plan(cfg: Any, gpus: Gpus | None) -> Plan:
    """The plan of ``cfg`` (a loaded ``RunConfig``) as asked, and on ``gpus`` when given."""
    import psutil

    from swiftk.contracts.chunked import CHUNK_ELEMENTS
    from swiftk.kernel import precision
    from swiftk.kernel.tuners import tuner_of

    cpu = gpus is not None and gpus.name == "cpu" or (gpus is None and not torch.cuda.is_available())
    bf16 = precision.native_bf16(torch.device("cpu")) if cpu else (gpus.bf16 if gpus else True)
    dtype = precision.storage_when(cfg.model.dtype, bf16, tuner_of(cfg.train).full_weights_master)
    compute = precision.compute_when(cfg.train.precision, bf16)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": compute}),
                                 "model": cfg.model.model_copy(update={"dtype": dtype})})
    rows = rows_per_micro_batch(cfg)
    config = hf_config(cfg.model)
    model = measure(cfg, config, precision.DTYPES[dtype], rows)
    runtime = float(psutil.Process().memory_info().rss) if cpu else CUDA_RUNTIME
    chunk = 3.0 * CHUNK_ELEMENTS * 4
    asked = layout_of(cfg)
    options = [(layout, per_gpu(model, layout, cfg, runtime, chunk))
               for layout in candidates(gpus.count, model, cfg.train.tuner_strategy, cfg.train.grad_accum)] \
        if gpus else []
    return Plan(model, asked, per_gpu(model, asked, cfg, runtime, chunk), gpus, options, cfg.train.tuner_strategy,
                rows, cfg.data.max_length)


def render(plan: Plan) -> str:
    """The plan as the console shows it."""
    m = plan.model
    lines = [f"model: {m.description} {m.params / 1e9:.3g} B params ({m.layers} layers, {m.heads} heads / "
             f"{m.kv_heads} KV heads, vocab {m.vocab}); {plan.tuner}: {m.trainable / 1e6:.4g} M trainable"
             + (f", {m.quantized / 1e9:.3g} B in 4/8 bits" if m.quantized else ""),
             f"micro-batch: {plan.rows} x {plan.tokens} tokens per rank (a TP group or a pipeline shares one)"]
    header = f"{'layout':<15} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'logits':>8} {'runtime':>8} " \
             f"{'total':>8} {'load':>8}"
    rows = [(plan.asked, plan.asked_memory, "(asked)")] + [(lay, mem, "") for lay, mem in plan.options]
    if plan.gpus:
        lines.append(f"GPUs: {plan.gpus.count} x {plan.gpus.name} ({plan.gpus.gib:g} GiB each)")
        header += "  fits"
    lines += ["", "GiB per GPU:", header]
    for layout, memory, tag in rows:
        values = memory.as_gib()
        fits = ""
        if plan.gpus and tag == "":
            fits = "  yes" if plan.fits(memory) else "  no"
        lines.append(f"{layout.name + (' ' + tag if tag else ''):<15} "
                     + " ".join(f"{values[k]:>8.2f}" for k in ("weights", "gradients", "optimizer", "activations",
                                                                 "logits", "runtime", "total", "load")) + fits)
    if plan.gpus:
        best = plan.best()
        lines.append("")
        if best is None:
            smallest = min(plan.options, key=lambda item: item[1].peak)
            lines.append(f"nothing fits {plan.gpus.gib:g} GiB: the smallest is {smallest[0].name} at "
                         f"{smallest[1].peak / GIB:.1f} GiB per GPU; lower batch_size or max_length, turn on "
                         f"gradient_checkpointing, or use a lighter tuner (lora, qlora)")
        else:
            lines.append(f"least memory that fits: {best[0].name}, {best[1].total / GIB:.1f} of {plan.gpus.gib:g} "
                         f"GiB per GPU")
    return "\n".join(lines)
