"""Run assembly: validate everything, then build model, data, plugins and optimizer, and hand them to the loop.

Order matters for the user: every config problem (schema, files, plugin names and arguments) is reported
at once before anything heavy is loaded, and nothing is written before the config is valid.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

import swiftk
from swiftk.contracts import PluginError, SamplingParams
from swiftk.contracts.chunked import compile_chunks, eager_chunks
from swiftk.contracts.conformance import describe
from swiftk.contracts.stages import Stage
from swiftk.hosts.supervisor import console
from swiftk.kernel import checkpoint, launch, precision
from swiftk.kernel import dist as distributed
from swiftk.kernel import parallel as engines
from swiftk.kernel.compiled import CompiledBlocks
from swiftk.kernel.config import Locator, PluginSource, RunConfig, load_config
from swiftk.kernel.data import Loader, read_rows
from swiftk.kernel.dist import DistInfo, from_env
from swiftk.kernel.errors import CheckpointError, ConfigError, ModelLoadError, RunDirError
from swiftk.kernel.generate import chat_prompt
from swiftk.kernel.heads import ChunkedHead
from swiftk.kernel.in_backward import InBackward
from swiftk.kernel.lean import lean_activations, lean_line, wanted
from swiftk.kernel.loop import Run, train
from swiftk.kernel.model import check_source, load_model, load_tokenizer, pick_device, resolve_source
from swiftk.kernel.plugins import (
    Plugins,
    build,
    build_stage,
    check_selection,
    hookimpl_problems,
    load_configured,
    selection,
    start_hosts,
    weight_decay,
)
from swiftk.kernel.progress import Reporter
from swiftk.kernel.reference import make_reference
from swiftk.kernel.reload import Reloader
from swiftk.kernel.tuners import (
    apply_tuner,
    base_fingerprint,
    quantization_config,
    save_final,
    save_merged,
    tuner_of,
)
from swiftk.kernel.vlm import load_processor, load_vision_model


@dataclass
class Options:
    """``swiftk run`` flags."""

    config: str
    overrides: list[str]
    resume: str | None = None  # "latest" or a checkpoint / run folder
    overwrite: bool = False
    merge: bool = False
    print_config: bool = False
    watch: bool = False


def prepare(options: Options, cfg: RunConfig | None = None) -> tuple[RunConfig, Plugins]:
    """Validate the config (unless ``cfg`` is it, already loaded), its files and its plugins, and build the
    plugins (their constructors check their values); raise one ``ConfigError`` listing every problem."""
    cfg = cfg or load_config(options.config, options.overrides)
    if cfg.loaded_plugins is not None:  # the files load_config imported; only C++ sources are left to build
        loaded, problems = list(cfg.loaded_plugins), cfg.plugin_problems + load_configured(cfg.plugins, python=False)[1]
    else:
        loaded, problems = load_configured(cfg.plugins)
    problems += [f"plugins: {entry.name}: {p}" for entry in loaded for p in hookimpl_problems(entry.module)]
    problems += check_files(cfg)
    problems += engines.config_problems(cfg)  # [device] written onto [distributed] first
    distributed.setup(cfg.distributed, cfg.model.device)  # under a launcher: join the other ranks
    # Hosts start on every rank or on none (a shared host's ranks wait for each other).
    hosts, host_problems = start_hosts(cfg) if not distributed.any_rank(bool(problems))[0] else (None, [])
    plugins = None
    try:
        problems += host_problems
        chosen = selection(cfg)
        problems += check_selection(chosen, hosts)
        if not problems:
            try:
                plugins = build(chosen, loaded, hosts)
                plugins.track("stage", cfg.train.stage)
                plugins.track("tuner", cfg.train.tuner_strategy)
            except Exception as exc:
                problems.append(f"plugins: building the configured plugins failed: {describe(exc)}")
    finally:
        if (problems or plugins is None) and hosts is not None:
            hosts.close()  # also when something above raised: no host outlives a failed start
    problems = distributed.gather_problems(problems)  # every rank stops, and says why, if one rank must
    if problems and plugins is not None and hosts is not None:  # only another rank had problems
        hosts.close()
    if problems or plugins is None:
        locator = Locator(Path(options.config).read_text(encoding="utf-8"), Path(options.config))
        raise ConfigError([locate(p, locator) for p in problems], options.config)
    return cfg, plugins


def eval_tasks(tasks: list[str]) -> list[Any]:
    from swiftk.kernel.evals.runner import resolve

    return resolve(tasks) if tasks else []


def eval_task_problems(tasks: list[str]) -> list[str]:
    from swiftk.kernel.evals.runner import TaskError, resolve

    try:
        resolve(tasks)
    except TaskError as exc:
        return [f"[eval] tasks: {exc}"]
    return []


def check_files(cfg: RunConfig) -> list[str]:
    problems = []
    for key, value in (("[data] train_file", cfg.data.train_file), ("[data] eval_file", cfg.data.eval_file),
                       ("[samples] prompts_file", cfg.samples.prompts_file)):
        if value is not None and not Path(value).exists():
            problems.append(f"{key}: {value} does not exist (relative paths are read from the current folder)")
    if cfg.model.init == "pretrained":
        try:
            check_source(cfg.model.model_id, resolve_source(cfg.model.model_id), cfg.model.gguf_file)
        except ModelLoadError as exc:
            problems.append(str(exc))
    device = cfg.model.device
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError:
            problems.append(f"[model] device: '{device}' is not a torch device; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        else:
            if device.startswith("cuda") and not torch.cuda.is_available():
                problems.append(f"[model] device: '{device}' but torch sees no CUDA device here; use 'auto' or 'cpu'")
    stage = build_stage(cfg.train)
    if cfg.data.dataset_name is not None:
        problems += named_dataset(cfg, stage)
    if cfg.data.task_type != "auto" and cfg.data.task_type not in stage.task_types:
        problems.append(f"[data] task_type: '{cfg.data.task_type}' does not fit [train] stage = '{cfg.train.stage}', "
                        f"which reads {' or '.join(map(repr, stage.task_types))} data")
    problems += stage.problems(cfg)
    several = cfg.distributed.num_processes * cfg.distributed.nnodes > 1
    if several and stage.engines is not None and cfg.distributed.backend not in stage.engines:
        problems.append(f"[distributed] backend = '{cfg.distributed.backend}': the {cfg.train.stage} stage runs in one "
                        f"process or under {' or '.join(stage.engines)}")
    if cfg.model.vision is not None and stage.vision != "generative":
        problems.append(f"[model.vision]: a vision encoder joined to the language model is read by [train] stage = "
                        f"'vlm' only; [train] stage = '{cfg.train.stage}' would ignore it")
    if cfg.eval.every and not cfg.data.eval_file and not cfg.eval.tasks:
        problems.append("[eval] every: set, but neither [data] eval_file nor [eval] tasks is; name an eval file or "
                        "tasks, or remove every")
    if cfg.eval.tasks:
        problems += eval_task_problems(cfg.eval.tasks)
    if tuner_of(cfg.train).full_weights_master and cfg.model.dtype not in ("float32", "auto"):
        problems.append(f"[model] dtype: '{cfg.model.dtype}' with tuner_strategy = '{cfg.train.tuner_strategy}' "
                        f"would train without "
                        f"fp32 master weights; keep 'float32' ([train] precision = 'bf16' still computes in bf16)")
    return problems


def named_dataset(cfg: RunConfig, stage: Stage) -> list[str]:
    """``[data] dataset_name``: find the named dataset's local copy, convert it into the stage's format once
    (cached, keyed by the source files' size and time), and train on the converted file (``cfg.data.train_path``;
    checkpoints record it, so a resume on a changed source is refused)."""
    from swiftk.plugins.datasets import DatasetError, resolve_dataset, summary

    task = cfg.data.task_type if cfg.data.task_type != "auto" else stage.task_types[0]
    try:
        path = resolve_dataset(cfg.data.dataset_name, task_type=task, dataset_path=cfg.data.dataset_path)
    except DatasetError as exc:
        return [f"[data] dataset_name: {exc}"]
    cfg.data.resolved(str(path))
    if from_env().is_main:
        print(f"data: {cfg.data.dataset_name} -> {summary(path)}")
    return []


def locate(problem: str, locator: Locator) -> str:
    """Append file:line to a ``[table] key: ...`` problem when the key is in the file."""
    if not problem.startswith("["):
        return problem
    table, _, rest = problem[1:].partition("] ")
    key = rest.split(":", 1)[0].split(" ", 1)[0]
    return f"{problem} ({locator.find((*table.split('.'), key))})"


def resolved_toml(cfg: RunConfig) -> str:
    import tomli_w

    def drop_none(value: Any) -> Any:  # TOML has no null
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_none(v) for v in value]
        return value

    return tomli_w.dumps(drop_none(cfg.model_dump(mode="json")))


def plan_run_dir(cfg: RunConfig, options: Options) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None for a fresh run); refuses an occupied folder
    without --resume/--overwrite. Nothing is created or deleted here: see ``make_run_dir``."""
    run_dir = Path(cfg.output.dir)
    if options.resume:
        if options.resume == "latest":
            target = latest_timestamped(run_dir) if cfg.output.timestamp else run_dir
        else:
            target = Path(options.resume)
        ckpt = target if (target / "meta.json").is_file() else checkpoint.latest_checkpoint(target)
        if ckpt is None:
            raise RunDirError(f"--resume: no checkpoint in {target} (looked for {target}/checkpoints/step-*/). "
                              f"Start without --resume, or point it at a run or checkpoint folder.")
        if cfg.output.timestamp and options.resume == "latest":
            run_dir = target
        return run_dir, ckpt
    if cfg.output.timestamp:
        run_dir = run_dir / time.strftime("%Y%m%d-%H%M%S")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not options.overwrite:
        raise RunDirError(
            f"[output] dir {run_dir} already holds a run. Pass --resume to continue it, --overwrite to delete "
            f"and replace it, or choose another dir (e.g. --set output.dir=runs/new)."
        )
    return run_dir, None


def latest_timestamped(root: Path) -> Path:
    """With ``[output] timestamp``, the newest run folder under ``root`` that holds a checkpoint."""
    runs = sorted(p for p in root.glob("*") if p.is_dir() and checkpoint.latest_checkpoint(p) is not None)
    return runs[-1] if runs else root


def make_run_dir(run_dir: Path, resuming: bool, dist: DistInfo) -> None:
    """Create the run folder; with --overwrite, the old run is deleted only now, once the config, data and
    model have all loaded."""
    if not dist.is_main:
        return
    if not resuming and run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_autocast(mode: str, device: torch.device) -> Any:
    """The forward passes' autocast context for ``[train] precision`` = ``mode`` on ``device``."""
    if precision.compute(mode, device) == "fp32":
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def chunked_head(model: torch.nn.Module, chunked: bool, say: Any) -> ChunkedHead | None:
    """The forward path to the hidden states of ``[train] chunked_loss``, or None (saying why, if the model is why)."""
    if not chunked:
        return None
    head, why = ChunkedHead.of(model)
    if head is None:
        say(f"chunked loss off: {why}; the losses read full logits")
    return head


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never biases, norms or other 1-d tensors. Each group names its tensors, and holds one kind of
    tensor: fused and foreach optimizers cannot mix DTensors with plain tensors, and tensor parallelism splits some
    layers only."""
    groups: dict[tuple[bool, type], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = param.dim() >= 2
            group = groups.setdefault((decay, type(param.data)), {"params": [], "names": [],
                                                                  "weight_decay": weight_decay if decay else 0.0})
            group["params"].append(param)
            group["names"].append(name)
    return [group for (decay, _), group in sorted(groups.items(), key=lambda item: not item[0][0])]  # decayed first


def data_transform(plugins: Plugins, split: str) -> Any:
    """``swiftk_data_row`` as a row -> row function, or None when no plugin implements it."""
    implemented = plugins.manager.hook.swiftk_data_row.get_hookimpls()
    return (lambda row: plugins.call("swiftk_data_row", row=row, split=split)) if implemented else None


def patched_model(plugins: Plugins, model: Any, tokenizer: Any, cfg: RunConfig) -> Any:
    """Give ``swiftk_model_loaded`` plugins the base model; at most one may replace it."""
    results = plugins.call("swiftk_model_loaded", model=model, tokenizer=tokenizer, config=cfg.model_dump())
    replacements = [r for r in results if r is not None]
    if len(replacements) > 1:
        raise PluginError("swiftk_model_loaded", "swiftk_model_loaded",
                          f"was answered with {len(replacements)} replacement models; only one plugin may replace it")
    return replacements[0] if replacements else model


@dataclass
class DataSource:
    """What a stage reads its data with (``contracts.stages.DataContext``)."""

    tokenizer: Any
    data: Any  # [data]
    eval: Any  # [eval]
    plugins: Plugins
    processor: Any = None  # a vision-language stage's: images and text

    def transform(self, split: str) -> Any:
        return data_transform(self.plugins, split)

    def call(self, hook: str, **kwargs: Any) -> Any:
        return self.plugins.call(hook, **kwargs)

    def implemented(self, hook: str) -> bool:
        return bool(getattr(self.plugins.manager.hook, hook).get_hookimpls())


def sample_prompts(cfg: RunConfig, stage: Stage) -> list[str]:
    if not stage.writes_text:
        return []  # e.g. a reward model scores text, it does not write any
    prompts = list(cfg.samples.prompts)
    if cfg.samples.prompts_file:
        prompts += [str(row["prompt"]) for _, row in read_rows(cfg.samples.prompts_file) if "prompt" in row]
    return prompts


def answer_samples(run: Run, prompts: list[str]) -> list[str]:
    """Greedy answers from the run's [generation] engine (a chat template renders each prompt as a user turn)."""
    rendered = [chat_prompt(run.tokenizer, p, run.cfg.data.system_prompt) for p in prompts]
    templated = run.tokenizer.chat_template is not None
    sampling = SamplingParams(max_new_tokens=run.cfg.samples.max_new_tokens)
    return [c.text.strip() for c in run.generator().generate(rendered, sampling, templated=templated)]


def execute(options: Options) -> int:
    """``swiftk run``: returns the process exit code (0 done, 130 interrupted)."""
    cfg = load_config(options.config, options.overrides)
    relaunch = not engines.apply_device(cfg) and launch.wanted(cfg.distributed)  # else prepare() says why
    if relaunch and not options.print_config:  # this process becomes the ranks' agent
        return launch.relaunch(cfg.distributed, child_args(options), cfg.output.dir)
    clean = False
    try:
        cfg, plugins = prepare(options, cfg)
        try:
            code = train_and_finish(cfg, plugins, options)
            clean = True
            return code
        except RuntimeError as exc:  # a collective failed: another rank died or hangs
            lost = distributed.lost_peer(exc)
            if lost is None:
                raise
            raise lost from None
        finally:
            plugins.close()  # plugin hosts: no process or shared segment outlives the run
    finally:
        distributed.shutdown(clean)  # barrier + destroy_process_group, on every path


def child_args(options: Options) -> list[str]:
    """The ``swiftk`` arguments each rank of a relaunched run gets: this command's own."""
    args = ["run", options.config, *(f"--set={o}" for o in options.overrides)]
    if options.resume:
        args.append(f"--resume={options.resume}")
    flags = {"--overwrite": options.overwrite, "--merge": options.merge, "--watch": options.watch}
    return args + [flag for flag, on in flags.items() if on]


def train_and_finish(cfg: RunConfig, plugins: Plugins, options: Options) -> int:
    if options.print_config:
        print(resolved_toml(cfg), end="")
        return 0
    dist = from_env()
    distributed.check_same(cfg.model_dump(mode="json"), plugins.code_hashes)
    run_dir, resume_from = plan_run_dir(cfg, options)
    distributed.barrier()  # every rank has looked at the run folder before rank 0 creates it
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    say = print if dist.is_main else (lambda *a, **k: None)
    asked = cfg.train.precision
    cfg = precision.resolved(cfg, device, tuner_of(cfg.train).full_weights_master)  # "auto" as this device runs it

    say(f"swiftk {swiftk.__version__} | run dir {run_dir} | device {device} | precision "
        f"{precision.describe(asked, cfg.train.precision, device)}")
    stage = build_stage(cfg.train)
    # A vision-language stage reads images through the model's processor; its tokenizer is the processor's.
    processor = load_processor(cfg.model) if stage.vision else None
    tokenizer = processor.tokenizer if processor is not None else load_tokenizer(cfg.model)
    source = DataSource(tokenizer, cfg.data, cfg.eval, plugins, processor)
    train_samples = stage.load(cfg.data.train_path, "train", source)
    eval_samples = stage.load(cfg.data.eval_file, "eval", source) if cfg.data.eval_file else []
    collate_fn = stage.collate(source)
    say(f"data: {len(train_samples)} training {stage.unit} from {cfg.data.train_path}"
        + (f", {len(eval_samples)} eval {stage.unit}" if eval_samples else ""))

    started = time.perf_counter()
    if processor is not None:
        model = load_vision_model(cfg.model, processor, device, stage.vision)
    else:
        model = load_model(cfg.model, len(tokenizer), device,
                           reward_head_pad_id=tokenizer.pad_token_id if stage.reward_head else None,
                           quantization=quantization_config(cfg.train))
    model = apply_tuner(patched_model(plugins, model, tokenizer, cfg), cfg.train, reward_head=stage.reward_head)
    own = {name for name, _ in model.named_parameters()}
    stage.adapt(model, tokenizer)  # e.g. ppo: a value head, trained with the model
    added = frozenset(name for name, _ in model.named_parameters() if name not in own)  # not the served model's
    fingerprint = base_fingerprint(model)  # before sharding
    parallel = engines.create(cfg.distributed, dist)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"model: {type(model).__name__} {total / 1e6:.1f} M params, {trainable / 1e6:.3f} M trainable "
        f"({cfg.train.tuner_strategy}), loaded in {time.perf_counter() - started:.1f} s")

    autocast = make_autocast(cfg.train.precision, device)
    # The reference is copied from the model before sharding (a copy of an FSDP2 module is not a model), then
    # sharded like it.
    # Losses from the hidden states, chunk by chunk: not with a reward head or a dual encoder (no LM head), nor
    # with a head gathered only in its forward (asked again once the engine is attached: DeepSpeed knows its ZeRO
    # stage only then). A tensor-parallel head is read split by vocabulary rows.
    chunked = (cfg.train.chunked_loss and not stage.reward_head and stage.vision != "dual"
               and parallel.head_readable)
    reference = make_reference(cfg.model.ref_model_id, cfg.model, model, len(tokenizer), device, autocast,
                               chunked) if stage.needs_reference else None
    model = parallel.wrap(model, device, cfg.train.precision)  # DDP or FSDP2 (before the optimizer sees params)
    if reference is not None and reference.model is not None:
        reference.model = parallel.wrap_frozen(reference.model, device, cfg.train.precision)
    optimizer = plugins.call("swiftk_optimizer_build", param_groups=param_groups(parallel.unwrap(model),
                             weight_decay(cfg.train)), lr=cfg.train.lr, model=parallel.unwrap(model))
    loader = Loader(train_samples, cfg.train.batch_size, collate_fn, cfg.train.seed, cfg.data.shuffle,
                    *parallel.data_shard)  # a tensor-parallel group reads one batch
    steps_per_epoch = math.ceil(loader.batches_per_epoch / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.train.warmup_steps
    if warmup is None:
        warmup = round(cfg.train.warmup_ratio * total_steps)
    scheduler = plugins.call("swiftk_scheduler_build", optimizer=optimizer, total_steps=total_steps,
                             warmup_steps=warmup)
    model = parallel.attach(model, optimizer, cfg.train)  # DeepSpeed: the engine takes model and optimizer
    # After the engine: a rewritten module falls back to its own forward where the engine splits its weights.
    if wanted(cfg.train.lean_activations, parallel.unwrap(model)):
        rewritten = lean_activations(parallel.unwrap(model), cfg.train.gradient_checkpointing)
        say(f"lean activations: {lean_line(rewritten)}")
    elif cfg.train.lean_activations == "auto":
        say("lean activations: off (auto: no LoRA layers; [train] lean_activations = true recomputes the norms and "
            "gated activations of a full fine-tune in backward, a third less kept for 3-7 % of a step)")

    make_run_dir(run_dir, resume_from is not None, dist)
    reporter = Reporter(run_dir if dist.is_main else None, total_steps, cfg.log.progress, cfg.log.every)
    run = Run(cfg, run_dir, model, tokenizer, plugins, optimizer, scheduler, loader, device, dist, reporter,
              total_steps, autocast, stage, eval_samples, reference=reference, parallel=parallel,
              stage_parameters=added, eval_tasks=eval_tasks(cfg.eval.tasks), processor=processor,
              head=chunked_head(parallel.unwrap(model), chunked and parallel.head_readable, say),
              compiled=CompiledBlocks.apply(parallel.unwrap(model), cfg.train.compile_config, say)
              if cfg.train.compile else None,
              in_backward=InBackward([p for p in parallel.unwrap(model).parameters() if p.requires_grad], optimizer)
              if cfg.train.optimizer_in_backward else None)
    if cfg.train.compile and run.head is not None:  # the losses in this process (a host's run eagerly)
        compile_chunks(cfg.train.compile_config, say)
        say("compile: the chunked loss's per-chunk maths too (linear_cross_entropy)")
    else:
        eager_chunks()
    stage.prepare(run, train_samples, eval_samples)  # e.g. dpo: score every pair with the reference once
    if plugins.hosts is not None:  # host deaths, restarts and plugin failures go to metrics.jsonl and the console
        plugins.hosts.sink = lambda event, fields: host_event(run, event, fields)
        sandbox_records(run)
    run.meta = {"swiftk_version": swiftk.__version__, "world_size": dist.world_size, "engine": parallel.name,
                "data_groups": parallel.data_shard[1], "layout": parallel.layout,
                "tuner_strategy": cfg.train.tuner_strategy, "base_fingerprint": fingerprint,
                "train_data": cfg.data.train_path,
                "config": cfg.model_dump(mode="json")}
    if resume_from is not None:
        restore(run, resume_from)
    if dist.is_main:
        (run_dir / "config.toml").write_text(resolved_toml(cfg), encoding="utf-8")
    reporter.event("run_start", step=run.step, total_steps=total_steps, world_size=dist.world_size,
                   stage=cfg.train.stage, pid=os.getpid(), host=socket.gethostname())

    try:
        return train_and_report(run, options, say)
    finally:
        run.close_generator()  # an engine process ends with the run, however it ends


def train_and_report(run: Run, options: Options, say: Any) -> int:
    """Samples before, training, then the run's end: events, final artefacts and samples after; 0, 130
    (interrupted) or 3 (paused by the stage, e.g. rewards that keep failing)."""
    cfg, plugins, reporter, dist, stage, total_steps = run.cfg, run.plugins, run.reporter, run.dist, run.stage, \
        run.total_steps
    prompts = sample_prompts(cfg, stage)
    if prompts and not run.parallel.whole_forward:
        say(f"samples: off under backend = '{run.parallel.name}' (no rank holds the whole model to answer with); "
            f"try the trained model with `swiftk infer {run.run_dir}`")
        prompts = []
    before = answer_samples(run, prompts) if prompts and run.step == 0 else []
    status = "failed"
    try:
        watched = watched_files(cfg, options.watch)
        if watched and dist.world_size > 1:
            say("hot reload is off with several processes: every rank must run the same plugin code")
        elif watched:
            run.reloader = Reloader(plugins, watched)
            run.reloader.start()
            say("watching for edits: " + ", ".join(watched))
        readers = run.parallel.data_shard[1]
        say(f"training: {total_steps} steps of {cfg.total_batch(readers)} samples (batch_size "
            f"{cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}"
            + (f" x {readers} data-parallel groups" if readers > 1 else "") + f"), from step {run.step}")
        status = train(run)
    finally:
        if run.reloader is not None:
            run.reloader.stop()
        try:
            plugins.call("swiftk_run_end", state=run.state(), status=status)
        except PluginError as exc:  # reported, never allowed to hide the run's own outcome
            print(f"warning: {exc}", file=sys.stderr)
        reporter.event("run_end", step=run.step, status=status)
        reporter.close()
        if plugins.hosts is not None:  # metrics.jsonl is closed: the hosts' shutdown events go to the console
            plugins.hosts.sink = console
    if status in ("interrupted", "paused"):
        again = " ".join([options.config, *(f"--set {shlex.quote(o)}" for o in options.overrides), "--resume"])
        say(f"{status} at step {run.step}; continue with: swiftk run {again}")
        return 130 if status == "interrupted" else EXIT_PAUSED

    finish(run, options, prompts, before, say)
    return 0


def watched_files(cfg: RunConfig, watch_all: bool) -> list[str]:
    """The plugin files to hot-reload: all of the config's with --watch (or ``watch = true`` at the top),
    else those whose [[plugins]] table says ``watch = true``. Importable modules are watched by their file."""
    files = []
    for item in cfg.plugins:
        source = item if isinstance(item, str) else item.source
        if not (watch_all or cfg.watch or (isinstance(item, PluginSource) and item.watch)):
            continue
        module = sys.modules.get(source)
        path = Path(getattr(module, "__file__", None) or source)
        if path.suffix == ".py" and path.is_file():
            files.append(str(path.resolve()))
    return files


def host_event(run: Run, event: str, fields: dict[str, Any]) -> None:
    """A host's event in metrics.jsonl and on the console; a tenant's is also an ``audit`` record (tenant, plugin,
    reason), the trail of what the sandbox stopped."""
    run.reporter.event(event, step=run.step, **{k: v for k, v in fields.items() if k != "traceback"})
    if "tenant" in fields:
        reason = fields.get("reason") or fields.get("error") or event
        run.reporter.event("audit", step=run.step, tenant=fields["tenant"], plugin=fields.get("plugin", "?"),
                           action=event, reason=str(reason))
    run.reporter.say(f"{event} at step {run.step}: " + " ".join(f"{k}={v}" for k, v in fields.items()))


def sandbox_records(run: Run) -> None:
    """What each tenant's host got from its sandbox, as an ``audit`` record when the run starts."""
    assert run.plugins.hosts is not None
    for host in run.plugins.hosts.hosts:
        if host.spec.tenant is not None and host.hello is not None:
            run.reporter.event("audit", step=run.step, tenant=host.spec.tenant.name, plugin=",".join(host.spec.names),
                               action="sandbox_started", reason="confined", layers=host.hello.sandbox or {})


def restore(run: Run, path: Path) -> None:
    """Put the run back exactly where checkpoint ``path`` left it."""
    weights, state, meta = checkpoint.load(path)
    writer = layout_change(meta, run, path)  # another engine, world size or layout: the same global batch
    moved = writer is not None
    changed = [c for c in config_changes(meta.get("config", {}), run.meta["config"])
               if not (moved and c.startswith("train.batch_size "))]
    if changed:
        raise CheckpointError(
            f"{path} was made with another config: {'; '.join(changed)}. An exact resume needs the same [model], "
            f"[data] and [train] (only max_steps/epochs, the device and the eval file may change); restore those "
            f"values, or start a new run "
            f"without --resume.")
    if run.cfg.data.dataset_name and meta.get("train_data", run.meta["train_data"]) != run.meta["train_data"]:
        raise CheckpointError(
            f"{path} was trained on {meta['train_data']}, and [data] dataset_name = '{run.cfg.data.dataset_name}' "
            f"now converts to {run.meta['train_data']}: its source files changed. Resume with the source the run "
            f"started from, or start a new run.")
    if meta.get("base_fingerprint") != run.meta["base_fingerprint"]:
        raise CheckpointError(
            f"{path} was trained on other base weights (fingerprint {meta.get('base_fingerprint')} vs "
            f"{run.meta['base_fingerprint']} now); resume with the same [model] as the original run.")
    optimizer_state, scheduler_state = state["optimizer"], state["scheduler"]
    try:
        if writer is not None and not run.parallel.own_partitions:  # whole tensors, laid out as this engine has them
            weights, optimizer_state = engines.engine_class(writer).whole_state(  # its partitions made whole, if any
                path, weights, optimizer_state, run.dist.local_rank)
            optimizer_state = checkpoint.optimizer_like(run.optimizer, optimizer_state, run.parallel.optimizer_by_name)
        if moved:
            scheduler_state = checkpoint.scheduler_like(scheduler_state, len(run.optimizer.param_groups))
        run.parallel.load(run.model, run.optimizer, weights, optimizer_state, path, writer)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    run.scheduler.load_state_dict(scheduler_state)
    run.loader.load_state_dict(state["loader"])
    for name, plugin_state in state["plugins"].items():
        plugin = run.plugins.by_name.get(name)
        if plugin is not None and hasattr(plugin, "load_state_dict"):
            plugin.load_state_dict(plugin_state)
    counters = state["counters"]
    run.step, run.tokens_seen, run.elapsed_s = counters["step"], counters["tokens_seen"], counters["elapsed_s"]
    # each rank's own, when it has one; after a change of layout rank 0's (a TP group's ranks must agree)
    checkpoint.set_rng_state((None if moved else run.parallel.load_rng(path)) or state["rng"])
    changed = {k: (v, run.plugins.code_hashes.get(k)) for k, v in meta.get("plugin_code", {}).items()
               if run.plugins.code_hashes.get(k) != v}
    if changed:
        for name, (old, new) in changed.items():
            print(f"note: plugin '{name}' code changed since the checkpoint ({old} -> {new})")
            run.reporter.event("plugin_code_changed", step=run.step, plugin=name, old_hash=old, new_hash=new)
    run.plugins.call("swiftk_checkpoint_load", state=run.state(), path=str(path / "plugins"))
    run.last_saved_step = run.step
    run.reporter.resume_at(run.step)
    run.reporter.event("resumed", step=run.step, path=str(path))
    run.reporter.say(f"resumed from {path} at step {run.step}")


def layout_change(meta: dict[str, Any], run: Run, path: Path) -> str | None:
    """The engine that wrote checkpoint ``path`` when it did so under another engine, world size or layout (a ZeRO
    stage, a tp_size...) than this run's, else None; raise if this run cannot continue it exactly: the global batch
    (``batch_size`` x the ranks reading different data) must stay the same, so that every step sees the same
    samples."""
    engine, world = meta.get("engine", "none" if meta.get("world_size", 1) == 1 else None), meta.get("world_size", 1)
    now, layout = run.parallel.name, run.parallel.layout
    groups = run.parallel.data_shard[1]
    if world == run.dist.world_size and engine in (now, None) and meta.get("layout", layout) == layout and \
            meta.get("data_groups", groups) == groups:
        return None
    fix = "consolidate it into a model folder (python -m swiftk.kernel.consolidate) and start a new run from it"
    if engine is None:
        raise CheckpointError(
            f"{path} was written by {world} processes of an older swiftk, which did not record its engine, and this "
            f"run has {run.dist.world_size} ({now}): set [distributed] as before, or {fix}.")
    saved = meta.get("config", {}).get("train", {}).get("batch_size", 0) * meta.get("data_groups", world)
    global_batch = run.cfg.train.batch_size * groups
    if saved != global_batch:
        raise CheckpointError(
            f"{path} trained on {saved} samples a micro-step ({engine}, {world} processes) and this run would take "
            f"{global_batch} ({now}, {groups} data-parallel group{'s' if groups != 1 else ''} of batch_size "
            f"{run.cfg.train.batch_size}); set [train] batch_size = {saved // groups} to continue it exactly, or "
            f"{fix}.")
    where = f" ({', '.join(f'{k} {v}' for k, v in layout.items())})" if layout else ""
    run.reporter.say(f"resuming a {engine} checkpoint of {world} process{'es' if world != 1 else ''} as {now}{where} "
                     f"on {run.dist.world_size}")
    return engine


# Values a resume may change without breaking exactness: the run's length, where it runs, what it evaluates.
EXIT_PAUSED = 3  # a stage paused the run (contracts.rewards.PauseRun); --resume continues it
RESUMABLE_CHANGES = {("train", "max_steps"), ("train", "epochs"), ("model", "device"), ("data", "eval_file")}


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``table.key: old -> new`` for each [model]/[data]/[train] value that differs from the checkpoint's."""
    changes = []
    for table in ("model", "data", "train"):
        old, new = saved.get(table, {}), now.get(table, {})
        # A [train] key this run's schema lacks belongs to a stage or tuner it does not use (checkpoints written
        # before components owned their keys hold them all); the stage and tuner themselves are compared.
        for key in sorted(set(new) | (set(old) if table != "train" else set())):
            if (table, key) not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
                changes.append(f"{table}.{key} {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def finish(run: Run, options: Options, prompts: list[str], before: list[str], say: Any) -> None:
    """Final artefacts (adapter or model, merged folder), the after-training samples, and where it all is."""
    cfg = run.cfg
    model = run.parallel.unwrap(run.model)
    # Sharded weights are gathered, and sharded models generate, on every rank: both are collectives.
    weights = run.parallel.full_weights(run.model) if run.parallel.sharded and cfg.output.save_final else None
    after = answer_samples(run, prompts) if prompts and (run.dist.is_main or run.parallel.sharded) else []
    if not run.dist.is_main:
        return
    outputs = []
    if cfg.output.save_final:
        saver = run.processor or run.tokenizer  # a processor saves the tokenizer and the image processor
        final = save_final(model, saver, run.run_dir / "final", cfg.train) if weights is None else \
            distributed.save_gathered(model, saver, run.run_dir / "final", weights)
        outputs.append(f"{final} ({'PEFT adapter' if isinstance(model, PeftModel) else 'HF model'})")
    if prompts:
        show_samples(prompts, before, after, say)
        (run.run_dir / "samples.json").write_text(json.dumps(
            [{"prompt": p, "before": b, "after": a} for p, b, a in
             zip(prompts, before or [None] * len(prompts), after, strict=True)], indent=2))
    if options.merge or cfg.output.merge:
        if isinstance(model, PeftModel) and run.parallel.sharded and not cfg.output.save_final:
            say("merge: sharded weights are merged from final/, which [output] save_final = false did not write")
        elif isinstance(model, PeftModel) and run.parallel.sharded:  # the adapter on a rebuilt whole base
            from swiftk.kernel.export import export

            for line in export(run.run_dir, run.run_dir / "merged", merge=True, check=False):
                say(f"merge: {line}")
            outputs.append(f"{run.run_dir / 'merged'} (merged HF model)")
        elif isinstance(model, PeftModel):
            merged = save_merged(model, run.processor or run.tokenizer, run.run_dir / "merged", cfg.train)
            outputs.append(f"{merged} (merged HF model)")
    say(f"done: {run.step} steps in {run.elapsed_s:.0f} s of training. Run directory: {run.run_dir}")
    for line in [*outputs, f"{run.run_dir / 'metrics.jsonl'} (per-step metrics; `swiftk plot {run.run_dir}`)"]:
        say(f"  {line}")


def show_samples(prompts: list[str], before: list[str], after: list[str], say: Any) -> None:
    say("\nanswers to held-out prompts" + (" (before -> after training):" if before else " (after training):"))
    for i, prompt in enumerate(prompts):
        say(f"  Q: {prompt}")
        if before:
            say(f"     before: {one_line(before[i])}")
        say(f"     after:  {one_line(after[i])}")
    say("")


def one_line(text: str, width: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
