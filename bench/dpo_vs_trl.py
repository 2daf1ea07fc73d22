"""swiftk's DPO stage against TRL's DPOTrainer: same tiny model, data, batches and settings, interleaved.

    .venv/bin/python bench/dpo_vs_trl.py [--steps 40] [--rounds 2]

Both train the tiny random-init Llama (configs/tiny_dpo.toml's) with full fine-tuning on the shipped addition
pairs: 32 pairs per step, max_length 32, bf16 autocast, AdamW at 5e-4 with cosine decay, beta 0.1, sigmoid loss,
the pairs in file order (no shuffling, so both see the same batches), and a frozen copy of the initial model as
the reference, run every step (TRL's default; swiftk's `precompute_ref_logps = false`). Prints one JSON line:
median step times (first 5 steps dropped), ``speedup_vs_trl`` (TRL / swiftk), swiftk's step time with the
reference precomputed, and both runs' first-step metrics, which must agree.
Goal: ``speedup_vs_trl`` >= 1.25.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from swiftk.contracts import events  # noqa: E402
from swiftk.kernel.cli import main as swiftk  # noqa: E402
from swiftk.kernel.config import load_config  # noqa: E402
from swiftk.kernel.model import load_model, load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_dpo.toml"
SHARED = ["data.shuffle=false", "train.batch_size=32", "train.lr=5e-4", "train.warmup_steps=2",
          "train.beta=0.1", 'train.loss_type="sigmoid"', "eval.every=100000", "output.save_every=100000",
          "output.save_final=false"]
FIRST = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def run_swiftk(steps: int, tmp: Path, precompute: bool) -> tuple[float, dict[str, float]]:
    sets = [*SHARED, f"train.max_steps={steps}", f"train.precompute_ref_logps={str(precompute).lower()}",
            f'output.dir="{tmp / "swiftk"}"', 'log.progress="none"']
    with contextlib.redirect_stdout(sys.stderr):
        assert swiftk(["run", str(CONFIG), "--overwrite", *[a for s in sets for a in ("--set", s)]]) == 0
    steps_ = events.steps(events.read(tmp / "swiftk" / "metrics.jsonl"))
    first = {"loss": steps_[0].loss, **steps_[0].metrics}
    return statistics.median(r.tokens / r.tokens_per_s for r in steps_[5:] or steps_), first


class InOrder(DPOTrainer):  # type: ignore[misc]
    """The pairs in file order, as swiftk is told to read them (``data.shuffle = false``)."""

    def _get_train_sampler(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return SequentialSampler(self.train_dataset)


class StepTimes(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.times.append(time.perf_counter() - self.started)


def run_trl(steps: int, tmp: Path) -> tuple[float, dict[str, float]]:
    cfg = load_config(CONFIG, SHARED)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)  # the same random init as swiftk's run
    model = load_model(cfg.model, len(tokenizer), torch.device("cpu"))
    rows = [json.loads(line) for line in (REPO / cfg.data.train_file).read_text().splitlines()]
    args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=32, max_steps=steps, learning_rate=5e-4,
                     lr_scheduler_type="cosine", warmup_steps=2, weight_decay=cfg.train.weight_decay, bf16=True,
                     use_cpu=True, max_length=cfg.data.max_length, beta=0.1, loss_type="sigmoid", report_to=[],
                     logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=cfg.train.seed,
                     disable_tqdm=True, max_grad_norm=cfg.train.max_grad_norm)
    timer = StepTimes()
    trainer = InOrder(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=[timer])
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    return statistics.median(timer.times[5:] or timer.times), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"swiftk": [], "trl": [], "swiftk_precomputed": []}
    firsts: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="swiftk-dpo-bench-") as tmp:
        for round_ in range(args.rounds):
            order = ("swiftk", "trl", "swiftk_precomputed") if round_ % 2 == 0 else \
                ("trl", "swiftk_precomputed", "swiftk")
            for name in order:
                if name == "trl":
                    step, first = run_trl(args.steps, Path(tmp))
                else:
                    step, first = run_swiftk(args.steps, Path(tmp), precompute=name == "swiftk_precomputed")
                times[name].append(step)
                firsts[name] = first
    swiftk_s, trl_s = statistics.median(times["swiftk"]), statistics.median(times["trl"])
    print(json.dumps({
        "swiftk_step_s": round(swiftk_s, 4), "trl_step_s": round(trl_s, 4),
        "speedup_vs_trl": round(trl_s / swiftk_s, 3),
        "swiftk_precomputed_step_s": round(statistics.median(times["swiftk_precomputed"]), 4),
        "speedup_precomputed_vs_trl": round(trl_s / statistics.median(times["swiftk_precomputed"]), 3),
        "first_step": {name: {k: round(float(firsts[name][k]), 4) for k in FIRST if k in firsts[name]}
                       for name in ("swiftk", "trl")},
    }))


if __name__ == "__main__":
    main()
