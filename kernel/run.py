"""Run assembly: validate everything, then build model, data, plugins and optimizer, and hand them to the loop.

Order matters for the user: every config problem (schema, files, plugin names and arguments) is reported
at once before anything heavy is loaded, and nothing is written before the config is valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import swiftk
from swiftk.contracts import PluginError
from swiftk.kernel import checkpoint
from swiftk.kernel.config import Locator, RunConfig, load_config
from swiftk.kernel.data import Loader, Sample, build_dataset, collate, detect_format, read_rows
from swiftk.kernel.dist import DistInfo, from_env
from swiftk.kernel.errors import CheckpointError, ConfigError, ModelLoadError, RunDirError
from swiftk.kernel.evaluate import references
from swiftk.kernel.generate import chat_prompt, complete
from swiftk.kernel.loop import Run, train
from swiftk.kernel.model import check_source, load_model, load_tokenizer, pick_device, resolve_source
from swiftk.kernel.plugins import (
    Plugins,
    build,
    check_selection,
    hookimpl_problems,
    load_configured,
    selection,
    weight_decay,
)
from swiftk.kernel.progress import Reporter
from swiftk.kernel.tuners import apply_tuner, base_fingerprint, load_trainable, save_final, save_merged


@dataclass
class Options:
    """``swiftk run`` flags."""

    config: str
    overrides: list[str]
    resume: str | None = None  # "latest" or a checkpoint / run folder
    overwrite: bool = False
    merge: bool = False
    print_config: bool = False


def prepare(options: Options) -> tuple[RunConfig, list[Any]]:
    """Validate the config, its files and its plugins; raise one ``ConfigError`` listing every problem."""
    cfg = load_config(options.config, options.overrides)
    import swiftk.plugins  # noqa: F401  (registers the built-ins)

    loaded, problems = load_configured(cfg.plugins)
    problems += [f"plugins: {entry.name}: {p}" for entry in loaded for p in hookimpl_problems(entry.module)]
    problems += check_selection(selection(cfg))
    problems += check_files(cfg)
    if problems:
        locator = Locator(Path(options.config).read_text(encoding="utf-8"), Path(options.config))
        raise ConfigError([locate(p, locator) for p in problems], options.config)
    return cfg, loaded


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
    if cfg.eval.every and not cfg.data.eval_file:
        problems.append("[eval] every: set, but [data] eval_file is not; name an eval file or remove every")
    if cfg.train.tuner_strategy == "full" and cfg.model.dtype != "float32":
        problems.append(f"[model] dtype: '{cfg.model.dtype}' with tuner_strategy = 'full' would train without "
                        f"fp32 master weights; keep 'float32' ([train] precision = 'bf16' still computes in bf16)")
    return problems


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


def prepare_run_dir(cfg: RunConfig, options: Options, dist: DistInfo) -> tuple[Path, Path | None]:
    """The run folder, and the checkpoint to resume from (None for a fresh run)."""
    run_dir = Path(cfg.output.dir)
    if cfg.output.timestamp and not options.resume:
        run_dir = run_dir / time.strftime("%Y%m%d-%H%M%S")
    if options.resume:
        target = run_dir if options.resume == "latest" else Path(options.resume)
        ckpt = target if (target / "meta.json").is_file() else checkpoint.latest_checkpoint(target)
        if ckpt is None:
            raise RunDirError(f"--resume: no checkpoint in {target} (looked for {target}/checkpoints/step-*/). "
                              f"Start without --resume, or point it at a run or checkpoint folder.")
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, ckpt
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not options.overwrite:
        raise RunDirError(
            f"[output] dir {run_dir} already holds a run. Pass --resume to continue it, --overwrite to delete "
            f"and replace it, or choose another dir (e.g. --set output.dir=runs/new)."
        )
    if dist.is_main:
        if occupied:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_autocast(precision: str, device: torch.device) -> Any:
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never biases, norms or other 1-d tensors. Each group names its tensors."""
    groups: list[dict[str, Any]] = [{"params": [], "names": [], "weight_decay": weight_decay},
                                    {"params": [], "names": [], "weight_decay": 0.0}]
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = groups[0] if param.dim() >= 2 else groups[1]
            group["params"].append(param)
            group["names"].append(name)
    return [g for g in groups if g["params"]]


def data_transform(plugins: Plugins, split: str) -> Any:
    """``swiftk_data_row`` as a row -> row function, or None when no plugin implements it."""
    implemented = plugins.manager.hook.swiftk_data_row.get_hookimpls()
    return (lambda row: plugins.call("swiftk_data_row", row=row, split=split)) if implemented else None


def make_collate(plugins: Plugins, pad_id: int) -> Any:
    """The kernel's right-padding collator, unless a ``swiftk_data_collate`` plugin builds the batches."""
    def plugin_collate(samples: list[Sample]) -> Any:
        batch = plugins.call("swiftk_data_collate", samples=[s.as_dict() for s in samples], pad_id=pad_id)
        return batch if batch is not None else collate(samples, pad_id)

    implemented = plugins.manager.hook.swiftk_data_collate.get_hookimpls()
    return plugin_collate if implemented else (lambda samples: collate(samples, pad_id))


def patched_model(plugins: Plugins, model: Any, tokenizer: Any, cfg: RunConfig) -> Any:
    """Give ``swiftk_model_loaded`` plugins the base model; at most one may replace it."""
    results = plugins.call("swiftk_model_loaded", model=model, tokenizer=tokenizer, config=cfg.model_dump())
    replacements = [r for r in results if r is not None]
    if len(replacements) > 1:
        raise PluginError("swiftk_model_loaded", "swiftk_model_loaded",
                          f"was answered with {len(replacements)} replacement models; only one plugin may replace it")
    return replacements[0] if replacements else model


def sample_prompts(cfg: RunConfig) -> list[str]:
    prompts = list(cfg.samples.prompts)
    if cfg.samples.prompts_file:
        prompts += [str(row["prompt"]) for _, row in read_rows(cfg.samples.prompts_file) if "prompt" in row]
    return prompts


def answer_samples(run: Run, prompts: list[str]) -> list[str]:
    rendered = [chat_prompt(run.tokenizer, p) for p in prompts]
    templated = run.tokenizer.chat_template is not None
    return complete(run.model, run.tokenizer, rendered, run.cfg.samples.max_new_tokens, templated,
                    autocast=run.autocast)


def execute(options: Options) -> int:
    """``swiftk run``: returns the process exit code (0 done, 130 interrupted)."""
    cfg, loaded = prepare(options)
    if options.print_config:
        print(resolved_toml(cfg), end="")
        return 0
    dist = from_env()
    run_dir, resume_from = prepare_run_dir(cfg, options, dist)
    seed_everything(cfg.train.seed)
    device = pick_device(cfg.model.device)
    say = print if dist.is_main else (lambda *a, **k: None)

    say(f"swiftk {swiftk.__version__} | run dir {run_dir} | device {device} | precision {cfg.train.precision}")
    plugins = build(selection(cfg), loaded)
    tokenizer = load_tokenizer(cfg.model)
    train_samples = build_dataset(cfg.data.train_file, tokenizer, cfg.data, data_transform(plugins, "train"))
    eval_samples, eval_refs = [], []
    if cfg.data.eval_file:
        eval_transform = data_transform(plugins, "eval")
        eval_samples = build_dataset(cfg.data.eval_file, tokenizer, cfg.data, eval_transform)
        if cfg.eval.generates:
            rows = read_rows(cfg.data.eval_file)
            if eval_transform is not None:
                rows = [(where, new if (new := eval_transform(row)) is not None else row) for where, row in rows]
            eval_refs = references(rows, detect_format(rows, cfg.data.format), tokenizer)
    say(f"data: {len(train_samples)} training samples from {cfg.data.train_file}"
        + (f", {len(eval_samples)} eval samples" if eval_samples else ""))

    started = time.perf_counter()
    model = load_model(cfg.model, len(tokenizer), device)
    model = apply_tuner(patched_model(plugins, model, tokenizer, cfg), cfg.train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"model: {type(model).__name__} {total / 1e6:.1f} M params, {trainable / 1e6:.3f} M trainable "
        f"({cfg.train.tuner_strategy}), loaded in {time.perf_counter() - started:.1f} s")

    optimizer = plugins.call("swiftk_optimizer_build",
        param_groups=param_groups(model, weight_decay(cfg.train)), lr=cfg.train.lr, model=model)
    collate_fn = make_collate(plugins, tokenizer.pad_token_id)
    loader = Loader(train_samples, cfg.train.batch_size, collate_fn, cfg.train.seed, cfg.data.shuffle,
                    dist.rank, dist.world_size)
    steps_per_epoch = math.ceil(loader.batches_per_epoch / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.train.warmup_steps
    if warmup is None:
        warmup = round(cfg.train.warmup_ratio * total_steps)
    scheduler = plugins.call("swiftk_scheduler_build", optimizer=optimizer, total_steps=total_steps,
                             warmup_steps=warmup)

    reporter = Reporter(run_dir if dist.is_main else None, total_steps, cfg.log.progress, cfg.log.every)
    run = Run(cfg, run_dir, model, tokenizer, plugins, optimizer, scheduler, loader, device, dist, reporter,
              total_steps, make_autocast(cfg.train.precision, device), collate_fn, eval_samples, eval_refs)
    run.meta = {"swiftk_version": swiftk.__version__, "world_size": dist.world_size,
                "tuner_strategy": cfg.train.tuner_strategy, "base_fingerprint": base_fingerprint(model),
                "config_sha256": hashlib.sha256(resolved_toml(cfg).encode()).hexdigest()[:16]}
    if resume_from is not None:
        restore(run, resume_from)
    elif dist.is_main:
        (run_dir / "config.toml").write_text(resolved_toml(cfg), encoding="utf-8")

    prompts = sample_prompts(cfg)
    before = answer_samples(run, prompts) if prompts and run.step == 0 else []
    status = "failed"
    try:
        say(f"training: {total_steps} steps of {cfg.total_batch(dist.world_size)} samples "
            f"(batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}), from step {run.step}")
        status = train(run)
    finally:
        plugins.call("swiftk_run_end", state=run.state(), status=status)
        reporter.event("run_end", step=run.step, status=status)
        reporter.close()
    if status == "interrupted":
        say(f"interrupted at step {run.step}; continue with: swiftk run {options.config} --resume")
        return 130

    finish(run, options, prompts, before, say)
    return 0


def restore(run: Run, path: Path) -> None:
    """Put the run back exactly where checkpoint ``path`` left it."""
    weights, state, meta = checkpoint.load(path)
    if meta.get("base_fingerprint") != run.meta["base_fingerprint"]:
        raise CheckpointError(
            f"{path} was trained on other base weights (fingerprint {meta.get('base_fingerprint')} vs "
            f"{run.meta['base_fingerprint']} now); resume with the same [model] as the original run.")
    try:
        load_trainable(run.model, weights)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.loader.load_state_dict(state["loader"])
    for name, plugin_state in state["plugins"].items():
        plugin = run.plugins.by_name.get(name)
        if plugin is not None and hasattr(plugin, "load_state_dict"):
            plugin.load_state_dict(plugin_state)
    counters = state["counters"]
    run.step, run.tokens_seen, run.elapsed_s = counters["step"], counters["tokens_seen"], counters["elapsed_s"]
    checkpoint.set_rng_state(state["rng"])
    changed = {k: (v, run.plugins.code_hashes.get(k)) for k, v in meta.get("plugin_code", {}).items()
               if run.plugins.code_hashes.get(k) != v}
    if changed:
        for name, (old, new) in changed.items():
            print(f"note: plugin '{name}' code changed since the checkpoint ({old} -> {new})")
            run.reporter.event("plugin_code_changed", step=run.step, plugin=name, old_hash=old, new_hash=new)
    run.plugins.call("swiftk_checkpoint_load", state=run.state(), path=str(path / "plugins"))
    run.reporter.resume_at(run.step)
    run.reporter.event("resumed", step=run.step, path=str(path))
    run.reporter.say(f"resumed from {path} at step {run.step}")


def finish(run: Run, options: Options, prompts: list[str], before: list[str], say: Any) -> None:
    """Final artefacts (adapter or model, merged folder), the after-training samples, and where it all is."""
    cfg = run.cfg
    if not run.dist.is_main:
        return
    outputs = []
    if cfg.output.save_final:
        final = save_final(run.model, run.tokenizer, run.run_dir / "final")
        outputs.append(f"{final} ({'PEFT adapter' if cfg.train.tuner_strategy == 'lora' else 'HF model'})")
    if prompts:
        after = answer_samples(run, prompts)
        show_samples(prompts, before, after, say)
        (run.run_dir / "samples.json").write_text(json.dumps(
            [{"prompt": p, "before": b, "after": a} for p, b, a in
             zip(prompts, before or [None] * len(prompts), after, strict=True)], indent=2))
    if options.merge or cfg.output.merge:
        if cfg.train.tuner_strategy == "lora":
            merged = save_merged(run.model, run.tokenizer, run.run_dir / "merged")
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
