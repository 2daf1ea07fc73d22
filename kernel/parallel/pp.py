"""Pipeline parallelism (``torch.distributed.pipelining``): the decoder layers split into ``pp_size`` stages of
consecutive layers, one stage per rank, and the step's ``grad_accum`` micro-batches flowing through them on a GPipe
or 1F1B schedule; or (``interleaved_1f1b``, ``zero_bubble``) into ``pp_size x pp_stages_per_rank`` stages, rank r
holding stages r, r + pp_size, ... (Megatron's interleaved layout: each micro-batch loops through the ranks
``pp_stages_per_rank`` times, and the bubble shrinks by that factor).

    stage 0          the token embeddings, then its layers        sends hidden states [B, T, H] on
    stage s          its layers                                    receives, runs, sends on; gradients come back
    stage pp - 1     its layers, the final norm and the LM head    scores the logits with the loss plugin

    mesh (dp, pp), rank = dp_index * pp_size + stage: with several pipelines, FSDP2 shards each stage over the
    ranks that hold the same stage (``[distributed] num_processes / pp_size`` of them), which read different data.

    mesh (dp, pp, tp) with ``[distributed] tp_size``, rank = (dp_index * pp_size + stage) * tp_size + tp_index:
    each stage split over tp_size neighbouring ranks as ``backend = "tp"`` splits a model (``tp.split``, this
    stage's modules only), the hidden states sent between stages whole (each TP rank to its counterpart), the
    tied embeddings' two ends adding their gradients piece by piece; FSDP2 across the pipelines as above.

Every rank builds the model and keeps its stage's tensors; the other stages' move to the meta device (no
memory), under their own names (``model.layers.5`` stays ``model.layers.5``), so that checkpoints, ``--resume``
across layouts and the saved model are the one-process model's. Tied embeddings (SmolLM2, Llama 3.2, small
Qwen2.5) are held by the first and the last stage, their gradients summed between the two after every step, so
both copies stay equal; the checkpoint keeps one.

A step's micro-batches are padded to one shape (right padding; rows of padding where a batch is short): every stage
runs the causal mask alone, which gives every real token the output the padding mask would (padding comes after
it), and padding is never labelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from swiftk.contracts import IGNORE_INDEX, Batch, ModelOutputs
from swiftk.contracts.engines import StepWork
from swiftk.kernel.dist import DistInfo, DistributedError, agreed
from swiftk.kernel.parallel.fsdp import FSDP2, clip_mixed
from swiftk.kernel.parallel.none import indivisible

# model types whose decoder is embeddings -> layers (rotary positions, causal or sliding-window masks) -> norm
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
INTERLEAVED = ("interleaved_1f1b", "zero_bubble")  # schedules of several stages per rank


class PipelineParallel(FSDP2):
    """``[distributed] backend = "pp"``: ``pp_size`` ranks each hold a stage of consecutive layers; ``world_size /
    pp_size`` pipelines train on different data, each stage sharded with FSDP2 over them when there are several."""

    name = "pp"
    whole_forward = False  # no rank holds a whole model: no generation, no before/after samples

    def __init__(self, info: DistInfo | None = None, options: Any = None) -> None:
        super().__init__(info, options)
        self.tp_size = tp_size(options)  # ranks splitting each stage (3-D meshes), neighbours
        self.pp_size = pp_size(options, self.info.world_size // self.tp_size)
        self.group_size = self.pp_size * self.tp_size  # the ranks of a pipeline, its stages' TP groups included
        self.dp_size = self.info.world_size // self.group_size
        self.stage = self.info.rank // self.tp_size % self.pp_size
        self.tp_rank = self.info.rank % self.tp_size
        self.first, self.last = self.stage == 0, self.stage == self.pp_size - 1
        self.virtual = stages_per_rank(options)
        self.stages = self.pp_size * self.virtual  # in all; this rank holds stage + k * pp_size, k < virtual
        self.parts: list[StageModule] = []  # this rank's stages, in order
        self.device = torch.device("cpu")
        self.group: Any = None  # the ranks of this pipeline
        self.tie_group: Any = None  # this pipeline's first and last stage, when they hold tied embeddings
        self.tied: torch.nn.Parameter | None = None  # this rank's copy of the tied embedding
        self.skip: set[int] = set()  # parameters counted by another stage (the last stage's tied copy)
        self.schedule: Any = None  # training's, for micro-batches of shape
        self.shape: tuple[int, int, int] | None = None
        self.forward_only: tuple[tuple[int, int], Any] | None = None  # evaluation's, for batches of a shape
        self.current: tuple[StepWork, list[Batch], list[BaseException]] | None = None

    @classmethod
    def problems(cls, options: Any) -> list[str]:
        from swiftk.kernel.parallel.tp import group_problems

        world, tp = options.num_processes * options.nnodes, tp_size(options)
        if tp == 1:
            return indivisible("pp_size", pp_size(options, world), options)
        if problems := group_problems(tp, options, "a stage"):
            return problems
        pp = pp_size(options, world // tp)
        if pp < 2:
            return [f"[distributed] tp_size = {tp} leaves one pipeline stage on the {world} processes: set pp_size "
                    f"(at least 2; pp_size x tp_size ranks make a pipeline), or use backend = 'tp'"]
        if world % (pp * tp):
            return [f"[distributed] pp_size = {pp} x tp_size = {tp} ranks a pipeline does not divide the {world} "
                    f"processes (num_processes = {options.num_processes} x nnodes = {options.nnodes}): use sizes "
                    f"whose product divides {world}"]
        return []

    @classmethod
    def run_problems(cls, cfg: Any) -> list[str]:
        from swiftk.contracts.stages import LEARN, Stage
        from swiftk.kernel.config import stage_class
        from swiftk.kernel.parallel.tp import TensorParallel

        problems = TensorParallel.run_problems(cfg) if tp_size(cfg.distributed) > 1 else []
        stage = stage_class(cfg.train)
        if stage.phases != (LEARN,) or stage.needs_reference or stage.reward_head or stage.forward is not Stage.forward:
            problems.append(f"[train] stage = '{cfg.train.stage}': backend = 'pp' trains stages whose step is one "
                            f"forward of the language model scored by a loss on its logits (sft); this one "
                            f"generates, keeps a reference or a value head: use backend = 'fsdp' or 'tp'")
        stages = pp_size(cfg.distributed, cfg.distributed.num_processes * cfg.distributed.nnodes //
                         tp_size(cfg.distributed))
        virtual = stages_per_rank(cfg.distributed)
        rounds = max(1, cfg.train.grad_accum // stages)
        if cfg.distributed.pp_schedule in INTERLEAVED and cfg.train.grad_accum % rounds:
            problems.append(f"[train] grad_accum = {cfg.train.grad_accum}: the {cfg.distributed.pp_schedule} "
                            f"schedule runs the micro-batches in rounds of pp_size ({stages}), grad_accum // "
                            f"pp_size = {rounds} equal rounds, which {cfg.train.grad_accum} does not make; use "
                            f"grad_accum = {rounds * stages} (a multiple of pp_size always works)")
        if cfg.distributed.pp_schedule == "1f1b" and cfg.train.grad_accum < stages:
            problems.append(f"[train] grad_accum = {cfg.train.grad_accum}: the 1F1B schedule needs at least as many "
                            f"micro-batches per step as pipeline stages ({stages}); raise grad_accum (the stages "
                            f"idle less the more there are) or set [distributed] pp_schedule = 'gpipe'")
        layers = decoder_layer_count(cfg.model)
        if layers is not None and stages * virtual > layers:
            problems.append(f"[distributed] pp_size = {stages}" + (f" x pp_stages_per_rank = {virtual}" if virtual > 1
                            else "") + f" is more pipeline stages than the model's {layers} decoder layers: each "
                            f"stage needs at least one; use at most {layers} stages")
        if cfg.train.optimizer_in_backward:
            problems.append("[train] optimizer_in_backward: not with backend = 'pp' (the schedule runs the "
                            "backward passes); leave it off")
        if cfg.data.packing:
            problems.append("[data] packing: not with backend = 'pp' (the stages pass hidden states only, not where "
                            "each packed document starts); set packing = false")
        if (cfg.data.eval_file and cfg.eval.generates) or cfg.eval.tasks:
            problems.append("[eval] generate / exact_match / tasks: no rank holds the whole model under backend = 'pp' "
                            "to generate with; evaluate the trained model with `swiftk eval RUN`, or leave them off "
                            "(eval_loss and the metric plugins run through the pipeline)")
        return problems

    # --- the model split into stages

    @property
    def layout(self) -> dict[str, Any]:
        return {"pp_size": self.pp_size, "tp_size": self.tp_size, "stages_per_rank": self.virtual}

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        """Keep this rank's stage of ``model``: the other stages' tensors go to the meta device (no memory; the
        model keeps its shape and names, for checkpoints and the saved model) and stop training here."""
        from torch.distributed.device_mesh import init_device_mesh

        from swiftk.kernel import precision as precisions
        from swiftk.kernel.run import make_autocast

        causal, decoder, layers = parts(model)
        bounds = stage_bounds(layer_costs(decoder, causal, layers, self.options.pp_balance), self.stages)
        head = causal.get_output_embeddings()
        embedding = decoder.embed_tokens.weight
        tied = head.weight is embedding
        self.device = device
        shape, names = (self.dp_size, self.pp_size, self.tp_size), ("dp", "pp", "tp")
        mesh = init_device_mesh(device.type, shape if self.tp_size > 1 else shape[:2], mesh_dim_names=names if
                                self.tp_size > 1 else names[:2])
        self.group = mesh["pp"].get_group()
        if tied and embedding.requires_grad:  # every rank creates every pair's group, in the same order
            for pipeline in range(self.dp_size):
                for piece in range(self.tp_size):  # the first and last stage's ranks holding one piece of it
                    ends = [self.rank_of(0, pipeline, piece), self.rank_of(self.pp_size - 1, pipeline, piece)]
                    group = dist.new_group(ends)
                    if self.info.rank in ends:
                        self.tie_group = group
        if self.info.rank == 0:
            across = f", each stage split over {self.tp_size} ranks (tp)" if self.tp_size > 1 else ""
            print(f"pipeline: {describe(bounds, self.pp_size, self.options.pp_schedule)}{across}", flush=True)
        mine = [self.stage + k * self.pp_size for k in range(self.virtual)]
        own = [torch.nn.ModuleList(layers[i] for i in range(bounds[s], bounds[s + 1])) for s in mine]
        ends = [decoder.embed_tokens if self.first else None, decoder.norm if self.last else None,
                head if self.last else None]
        kept = [*own, *ends]
        owned = {id(m) for m in (*(layer for stage in own for layer in stage), *ends) if m is not None}
        to_meta([m for m in (*layers, decoder.embed_tokens, decoder.norm, head) if id(m) not in owned],
                {id(p) for m in kept if m is not None for p in m.parameters()})
        if self.tp_size > 1:  # this rank's stages split over its TP group, as backend = "tp" splits a model
            from swiftk.kernel.parallel.tp import split

            split(model, mesh["tp"], self.tp_size, self.dp_size,
                  only={name for name, m in model.named_modules() if id(m) in owned})
        compute = precisions.compute(precision, device) != "fp32"
        first_of, last_of = 0, self.stages - 1
        self.parts = [StageModule(causal.config, layers_of, ends[0] if s == first_of else None,
                                  ends[1] if s == last_of else None, ends[2] if s == last_of else None,
                                  decoder.rotary_emb, make_autocast(precision, device), embedding.dtype,
                                  torch.bfloat16 if compute else head.weight.dtype)
                      for s, layers_of in zip(mine, own, strict=True)]
        if self.dp_size > 1:  # replaces the parameters by sharded ones
            for part in self.parts:
                self.shard(part, precision, mesh["dp"], layers=list(part.layers))
            if tied:  # the stage's sharded copy under both names again, so the model holds it once
                decoder.embed_tokens.weight = head.weight = (self.parts[0].embed or self.parts[-1].head).weight
        causal.forward = self.pipelined_forward  # held-out evaluation's forward passes run through the stages
        if tied and embedding.requires_grad and (self.first or self.last):
            self.tied = self.parts[0].embed.weight if self.first else self.parts[-1].head.weight
            self.skip = {id(self.tied)} if self.last else set()  # the first stage's copy is counted
        return model

    def wrap_frozen(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        raise DistributedError("[distributed] backend = 'pp' trains no stage with a reference model")

    # --- one optimizer step

    def learn(self, work: StepWork) -> None:
        """The step's micro-batches through the pipeline: the first stage feeds their tokens, the last scores them
        with the loss plugin; then the tied embedding's two copies add their gradients, and every stage learns the
        step's loss from the last."""
        batches = padded(work.micro)
        for batch in batches:
            work.begin(batch)
        rows, length = batches[0].input_ids.shape
        schedule = self.schedule_for(rows, length, len(batches))
        failures: list[BaseException] = []
        self.current = (work, batches, failures)
        try:
            with agreed("swiftk_loss_compute", work.step):  # a loss that failed on the last stage stops every rank
                if self.first:
                    schedule.step(torch.cat([b.input_ids for b in batches]))
                elif self.last:
                    schedule.step(target=torch.arange(len(batches), device=self.device), return_outputs=False)
                else:
                    schedule.step()
                if failures:
                    raise failures[0]
        finally:
            self.current = None
        if self.tie_group is not None and self.tied is not None and self.tied.grad is not None:
            dist.all_reduce(local(laid_out(self.tied)), group=self.tie_group)
        dist.broadcast(work.total, src=self.rank_of(self.pp_size - 1), group=self.group)

    def loss_of(self, output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function on the last stage: micro-batch ``index``'s logits through the loss plugin.
        A failure is kept for ``learn`` to raise once the schedule has finished (the other stages are waiting for
        this one's gradients), and scores nothing meanwhile."""
        assert self.current is not None
        work, batches, failures = self.current
        if not failures:
            try:
                return self.scaled(work.loss(batches[int(index)], ModelOutputs(output)))
            except Exception as exc:  # noqa: BLE001 -- raised by learn, on every rank
                failures.append(exc)
        return (output * 0).sum()

    def schedule_for(self, rows: int, length: int, micro: int) -> Any:
        """The schedule for micro-batches of ``rows x length`` tokens; built again when the shape changes (the
        stages exchange buffers of known shapes)."""
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleInterleavedZeroBubble,
        )

        if self.shape == (rows, length, micro):
            return self.schedule
        kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
                 "zero_bubble": ScheduleInterleavedZeroBubble}
        stages = self.stages_of(rows, length)
        name = self.options.pp_schedule
        # each micro-batch's loss is already divided by the step's label count: gradients add up unscaled
        self.schedule = kinds[name](stages if name in INTERLEAVED else stages[0], micro, loss_fn=self.loss_of,
                                    scale_grads=False)
        self.shape = (rows, length, micro)
        return self.schedule

    def stages_of(self, rows: int, length: int) -> list[Any]:
        """This rank's stages for batches of ``rows x length`` tokens: what each receives and sends, declared."""
        from torch.distributed.pipelining import PipelineStage

        part = self.parts[0]
        meta = torch.device("meta")
        hidden = torch.empty(rows, length, part.hidden_size, dtype=part.wire, device=meta,
                             requires_grad=True)  # their gradients flow back
        tokens = torch.empty(rows, length, dtype=torch.long, device=meta)
        logits = torch.empty(rows, length, part.vocab_size, dtype=part.logits, device=meta, requires_grad=True)
        return [PipelineStage(part, self.stage + k * self.pp_size, self.stages, self.device,
                              input_args=tokens if part.first else hidden,
                              output_args=logits if part.last else hidden, group=self.group)
                for k, part in enumerate(self.parts)]

    def pipelined_forward(self, input_ids: torch.Tensor, **ignored: Any) -> Any:
        """The unwrapped model's forward under pp: ``input_ids`` through every stage of this pipeline (each rank of
        it calls this with the same batch, as held-out evaluation does), the logits sent from the last stage to all
        of them. The causal mask alone, as in training; no cache."""
        from torch.distributed.pipelining import ScheduleGPipe, ScheduleInterleaved1F1B
        from transformers.modeling_outputs import CausalLMOutputWithPast

        part = self.parts[0]
        rows, length = input_ids.shape
        if self.forward_only is None or self.forward_only[0] != (rows, length):
            stages = self.stages_of(rows, length)
            self.forward_only = ((rows, length), ScheduleGPipe(stages[0], 1) if len(stages) == 1
                                 else ScheduleInterleaved1F1B(stages, 1))
        schedule = self.forward_only[1]
        with torch.no_grad():
            if self.first:
                schedule.step(input_ids)
                logits = None
            else:
                logits = schedule.step() if self.last else None
            if logits is None:
                logits = torch.empty(rows, length, part.vocab_size, dtype=part.logits, device=self.device)
            dist.broadcast(logits, src=self.rank_of(self.pp_size - 1), group=self.group)
        return CausalLMOutputWithPast(logits=logits)

    def rank_of(self, stage: int, pipeline: int | None = None, piece: int | None = None) -> int:
        """The global rank of ``stage`` in ``pipeline`` (this rank's) holding TP piece ``piece`` (this rank's)."""
        pipeline = self.data_shard[0] if pipeline is None else pipeline
        return (pipeline * self.pp_size + stage) * self.tp_size + (self.tp_rank if piece is None else piece)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        """The norm over every stage's gradients (the tied copy counted once), clipped alike on every stage."""
        return clip_mixed(params, max_norm, self.skip, self.group, self.device)

    # --- checkpoints: every stage's tensors, whole, gathered on rank 0

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        own = {name: whole(p.detach()) for name, p in model.named_parameters() if p.requires_grad}
        merged: dict[str, torch.Tensor] = {}
        for part in self.gathered(own):
            merged.update(part)  # a tied embedding comes from the first and the last stage, equal
        return merged if self.info.rank == 0 else own

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """By name (``optimizer_by_name``), every stage's groups merged where their settings agree."""
        from swiftk.kernel.checkpoint import optimizer_by_name

        per_param, hyper = optimizer_by_name(optimizer.state_dict())
        state = {name: {k: whole(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
                 for name, values in per_param.items()}
        groups: dict[int, dict[str, Any]] = {}
        for name, settings in hyper.items():
            groups.setdefault(id(settings), {**without_names(settings), "params": []})["params"].append(name)
        merged: dict[str, Any] = {"state": {}, "param_groups": []}
        for part in self.gathered({"state": state, "param_groups": list(groups.values())}):
            merged["state"].update(part.get("state", {}))
            for group in part.get("param_groups", []):
                same = next((g for g in merged["param_groups"] if without_names(g) == without_names(group)), None)
                if same is None:
                    merged["param_groups"].append({**group, "params": list(group["params"])})
                else:
                    same["params"] += [name for name in group["params"] if name not in same["params"]]
        return merged if self.info.rank == 0 else {}

    def gathered(self, value: Any) -> list[Any]:
        """``value`` of the first pipeline's every stage on rank 0 (the other pipelines hold the same tensors)."""
        parts: list[Any] = [None] * self.info.world_size
        mine = value if self.data_shard[0] == 0 else {}
        dist.gather_object(mine, parts if self.info.rank == 0 else None, dst=0)
        return parts if self.info.rank == 0 else []

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             optimizer_state: dict[str, Any], path: Path, writer: str | None = None) -> None:
        """Whole tensors in, this stage's taken (a sharded one's piece cut on each rank, no communication); the
        optimizer state laid out as this stage's optimizer holds it."""
        from swiftk.kernel.checkpoint import optimizer_like

        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(weights))
        if missing:
            raise ValueError(f"the checkpoint has no {missing[0]} (and {len(missing) - 1} more): it was written for "
                             f"another model or tuner")
        with torch.no_grad():
            for name, param in params.items():
                local(param).copy_(local(like(weights[name], param)))
        state = optimizer_like(optimizer, optimizer_state, by_name=False)
        by_index = [p for group in optimizer.param_groups for p in group["params"]]
        state["state"] = {index: {k: like(v, by_index[index]) if isinstance(v, torch.Tensor) and v.dim() else v
                                  for k, v in values.items()} for index, values in state["state"].items()}
        optimizer.load_state_dict(state)


class StageModule(torch.nn.Module):
    """One stage's forward: the embeddings on the first, its decoder layers (rotary positions and the causal mask
    computed here, as the whole decoder does), the final norm and the LM head on the last."""

    def __init__(self, config: Any, layers: torch.nn.ModuleList, embed: torch.nn.Module | None,
                 norm: torch.nn.Module | None, head: torch.nn.Module | None, rotary: torch.nn.Module,
                 autocast: Callable[[], Any], wire: torch.dtype, logits: torch.dtype) -> None:
        super().__init__()
        self.layers, self.embed, self.norm, self.head, self.rotary = layers, embed, norm, head, rotary
        self.config, self.first, self.last = config, embed is not None, head is not None
        self.autocast, self.wire, self.logits = autocast, wire, logits  # the dtypes it sends on, and returns
        self.hidden_size, self.vocab_size = config.hidden_size, config.vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        makers = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        with self.autocast():
            hidden = self.embed(x) if self.embed is not None else x
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            rotary = self.rotary(hidden, positions)
            masks: dict[str, Any] = {}
            for layer in self.layers:
                kind = getattr(layer, "attention_type", "full_attention")
                if kind not in masks:
                    masks[kind] = makers[kind](config=self.config, inputs_embeds=hidden, attention_mask=None,
                                               cache=None, position_ids=positions)
                hidden = layer(hidden, attention_mask=masks[kind], position_ids=positions,
                               position_embeddings=rotary)
            if self.head is None or self.norm is None:
                return hidden.to(self.wire)
            logits: torch.Tensor = self.head(self.norm(hidden))
            return logits


def describe(bounds: list[int], ranks: int, schedule: str) -> str:
    """The split, for the console: e.g. "4 stages of layers 0 | 1 | 2 | 3 on 2 ranks (interleaved_1f1b: rank r
    holds stages r, r + 2)"."""
    runs = " | ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(bounds, bounds[1:], strict=False))
    count = len(bounds) - 1
    holds = f"rank r holds stages r, r + {ranks}" + (", ..." if count > 2 * ranks else "") if count > ranks else \
        "one stage per rank"
    return f"{count} stages of layers {runs} on {ranks} ranks ({schedule}: {holds})"


def stages_per_rank(options: Any) -> int:
    """``[distributed] pp_stages_per_rank``: 2 by default for the interleaved schedules, else 1."""
    given = getattr(options, "pp_stages_per_rank", None)
    return int(given) if given else 2 if getattr(options, "pp_schedule", "1f1b") in INTERLEAVED else 1


def tp_size(options: Any) -> int:
    """``[distributed] tp_size`` under pp: the ranks each stage is split over (1 when it is not set)."""
    return int(getattr(options, "tp_size", None) or 1)


def pp_size(options: Any, world: int) -> int:
    """``[distributed] pp_size``, or every process (of ``world``, those left by tp) when it is not set."""
    size = getattr(options, "pp_size", None)
    return int(size) if size else max(1, world)


def decoder_layer_count(model_cfg: Any) -> int | None:
    """``num_hidden_layers`` of ``[model]``'s config, read without weights (None when it cannot be read here: the
    split then says it when the model is built)."""
    from swiftk.kernel.errors import SwiftkError
    from swiftk.kernel.plan import hf_config

    try:
        config = hf_config(model_cfg)
    except (SwiftkError, OSError, ValueError):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    return count if isinstance(count, int) else None


def parts(model: torch.nn.Module) -> tuple[Any, Any, torch.nn.ModuleList]:
    """The causal LM under ``model`` (a PEFT wrapper's too), its decoder and the decoder's layers; an architecture
    whose forward the stages do not reproduce is an error naming it."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal, "config", None)
    kind = getattr(config, "model_type", type(causal).__name__)
    decoder = getattr(causal, "model", None)
    layers = getattr(decoder, "layers", None)
    if kind not in ARCHITECTURES or not isinstance(layers, torch.nn.ModuleList) or \
            not all(hasattr(decoder, a) for a in ("embed_tokens", "norm", "rotary_emb")):
        raise DistributedError(f"[distributed] backend = 'pp': {kind} models are not split into pipeline stages yet "
                               f"(built for {', '.join(ARCHITECTURES)}); use backend = 'fsdp' or 'ddp'")
    return causal, decoder, layers


def to_meta(modules: list[torch.nn.Module], kept: set[int]) -> None:
    """The tensors of ``modules`` that no kept module shares (a tied embedding is shared) replaced by frozen ones
    on the meta device: their memory is freed, their names and shapes stay."""
    for module in modules:
        for sub in module.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                if id(param) not in kept:
                    sub.register_parameter(name, torch.nn.Parameter(param.detach().to("meta"), requires_grad=False))
            for name, buffer in list(sub.named_buffers(recurse=False)):
                sub.register_buffer(name, buffer.to("meta"))


def layer_costs(decoder: Any, causal: Any, layers: torch.nn.ModuleList, balance: str) -> list[float]:
    """Per decoder layer, what it weighs on its stage (``balance = "memory"``: the bytes of its parameters as
    stored, 4-bit ones included, the embeddings' added to the first layer's and the head's and final norm's to the
    last; "layers": one each)."""

    def size(module: torch.nn.Module) -> float:
        return float(sum(p.numel() * p.element_size() for p in module.parameters()))

    return layer_costs_of([size(layer) for layer in layers], size(decoder.embed_tokens),
                          size(causal.get_output_embeddings()) + size(decoder.norm), balance)


def layer_costs_of(layers: list[float], first: float, last: float, balance: str) -> list[float]:
    """``layer_costs`` from sizes: each layer's, the first stage's extra, the last stage's extra."""
    if balance == "layers":
        return [1.0] * len(layers)
    costs = list(layers)
    costs[0] += first
    costs[-1] += last
    return costs


def stage_bounds(costs: list[float], stages: int) -> list[int]:
    """Where each stage's layers start (and the last ends): ``stages`` runs of at least one layer, the heaviest run
    as light as it can be."""
    n = len(costs)
    if stages > n:
        raise DistributedError(f"[distributed] pp_size = {stages} is more pipeline stages than the model's {n} "
                               f"decoder layers: each stage needs at least one; use pp_size <= {n}")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[s][i]: the lightest heaviest run splitting the first i layers into s runs; cut[s][i] where the last starts
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                heaviest = max(best[s - 1][j], prefix[i] - prefix[j])
                if heaviest < best[s][i] - 1e-9:
                    best[s][i], cut[s][i] = heaviest, j
    bounds, i = [n], n
    for s in range(stages, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    return bounds[::-1]


def padded(micro: list[Batch]) -> list[Batch]:
    """The micro-batches at one shape: tokens and rows of padding (unlabelled, masked) after the real ones."""
    import torch.nn.functional as F

    if any(b.position_ids is not None for b in micro):
        raise DistributedError("[distributed] backend = 'pp': batches with position ids (packed rows) cannot pass "
                               "between pipeline stages; set [data] packing = false")
    rows = max(b.input_ids.shape[0] for b in micro)
    length = max(b.input_ids.shape[1] for b in micro)
    out = []
    for b in micro:
        pad = (0, length - b.input_ids.shape[1], 0, rows - b.input_ids.shape[0])
        mask = None if b.attention_mask is None else F.pad(b.attention_mask, pad, value=0)
        out.append(Batch(F.pad(b.input_ids, pad, value=0), F.pad(b.labels, pad, value=IGNORE_INDEX), mask,
                         b.num_items_in_batch, None, b.extras, b.real_tokens))
    return out


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``param``: on its device, and cut into this rank's piece when ``param`` is sharded."""
    full = full.to(param.device)
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)


def laid_out(param: torch.nn.Parameter) -> torch.Tensor:
    """``param``'s gradient laid out as ``param`` is: a split embedding's comes back whole (replicated) from its
    lookup, and each end of a pipeline must add its own piece of it to the other end's."""
    grad = param.grad
    assert grad is not None
    if hasattr(grad, "placements") and tuple(grad.placements) != tuple(param.placements):
        param.grad = grad = grad.redistribute(placements=param.placements)
    return grad


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole on CPU (a sharded one gathered: a collective over the ranks holding its pieces)."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().cpu()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor (itself when it is not sharded)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def without_names(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("params", "names")}
