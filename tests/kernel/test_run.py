"""End to end: `swiftk run` on the tiny config, in-process, for a few CPU steps."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftk.contracts.events import CheckpointSavedEvent, EvalEvent, Event, MetricsTruncatedEvent, StepEvent, read
from swiftk.kernel.cli import main

from ..conftest import write_config


def records(run_dir: Path) -> tuple[list[StepEvent], list[Event]]:
    lines = read(run_dir / "metrics.jsonl")
    return [r for r in lines if isinstance(r, StepEvent)], [r for r in lines if not isinstance(r, StepEvent)]


def losses(run_dir: Path) -> dict[int, float]:
    return {r.step: r.loss for r in records(run_dir)[0]}


def test_tiny_run_trains_logs_evaluates_and_checkpoints(tiny_config: Path, tmp_path: Path) -> None:
    assert main(["run", str(tiny_config)]) == 0
    run = tmp_path / "run"
    steps, events = records(run)
    assert [r.step for r in steps] == list(range(1, 13))
    assert steps[0].tokens_per_s > 0 and steps[0].elapsed_s > 0 and steps[0].lr > 0
    first, last = steps[0].loss, sum(r.loss for r in steps[-4:]) / 4
    assert last < first - 0.5, f"loss did not fall: {first} -> {last}"
    saved = [e.step for e in events if isinstance(e, CheckpointSavedEvent)]
    assert saved == [4, 8, 12] and [e.step for e in events if isinstance(e, EvalEvent)] == [6, 12]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000008", "step-000012"]  # keep_last 2
    before = load_file(run / "checkpoints/step-000008/model.safetensors")
    after = load_file(run / "final/model.safetensors")
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert len(changed) == len(after), "every parameter should change between steps 8 and 12"
    assert (run / "config.toml").is_file()


@pytest.mark.parametrize(("precision", "golden", "rtol"), [
    ("bf16", [4.702560, 4.273532, 3.835763, 3.570632], 2e-3),  # autocast: compared with a tolerance
    ("fp32", [4.703014, 4.272573, 3.835196, 3.570673], 1e-4),  # kernels differ by CPU in the last bits
])
def test_golden_losses(tiny_config: Path, tmp_path: Path, precision: str, golden: list[float], rtol: float) -> None:
    """The first steps of the tiny run, fixed seed: guards the data order, masking, loss and optimizer maths, in
    each precision whatever "auto" picks on this machine. (Recorded on torch 2.13 CPU.)"""
    assert main(["run", str(tiny_config), "--set", "train.max_steps=4", "--set", "eval.every=4",
                 "--set", f"train.precision='{precision}'"]) == 0
    got = [losses(tmp_path / "run")[s] for s in (1, 2, 3, 4)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(golden), rtol=rtol, atol=0)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tiny_config: Path, tmp_path: Path) -> None:
    assert main(["run", str(tiny_config), "--set", "output.keep_last=5"]) == 0
    full = losses(tmp_path / "run")
    resumed_dir = tmp_path / "resumed"
    args = ["run", str(tiny_config), "--set", f"output.dir='{resumed_dir}'"]
    assert main([*args, "--resume", str(tmp_path / "run/checkpoints/step-000004")]) == 0
    again = losses(resumed_dir)
    assert sorted(again) == list(range(5, 13))
    assert all(again[s] == full[s] for s in again), {s: (full[s], again[s]) for s in again}


def test_lora_resume_is_exact_too(tiny_config: Path, tmp_path: Path) -> None:
    lora = ["--set", "train.tuner_strategy='lora'", "--set", "train.lora_dropout=0.1", "--set", "output.keep_last=5"]
    assert main(["run", str(tiny_config), *lora]) == 0
    saved = load_file(tmp_path / "run/checkpoints/step-000004/model.safetensors")
    assert saved and all("lora_" in k for k in saved), "a LoRA checkpoint holds only the adapter"
    other = ["--set", f"output.dir='{tmp_path / 'b'}'", "--resume", str(tmp_path / "run/checkpoints/step-000004")]
    assert main(["run", str(tiny_config), *lora, *other]) == 0
    full, again = losses(tmp_path / "run"), losses(tmp_path / "b")
    assert all(again[s] == full[s] for s in again)


def test_sigint_saves_a_checkpoint_and_resume_matches_the_uninterrupted_run(tiny_config: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "long.toml", tiny_config.read_text(), max_steps="60", save_every="1000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "swiftk", "run", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(records(tmp_path / "run")[0]) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "--resume" in out
    stopped = max(losses(tmp_path / "run"))
    assert stopped < 60 and (tmp_path / f"run/checkpoints/step-{stopped:06d}").is_dir()
    assert main(["run", str(cfg), "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(["run", str(cfg), "--set", f"output.dir='{reference}'"]) == 0
    resumed, full = losses(tmp_path / "run"), losses(reference)
    assert all(resumed[s] == full[s] for s in range(1, 61))


def test_gradient_accumulation_matches_one_big_batch(tiny_config: Path, tmp_path: Path) -> None:
    """16 x 1 and 8 x 2 see the same 16 samples in step 1; the loss is normalised by the step's token
    count, not averaged per micro-batch, so loss and gradient agree (fp32, so up to summation order)."""
    common = ["--set", "train.max_steps=1", "--set", "train.precision='fp32'", "--set", "eval.every=1"]
    big, small = tmp_path / "big", tmp_path / "small"
    assert main(["run", str(tiny_config), *common, "--set", f"output.dir='{big}'"]) == 0
    assert main(["run", str(tiny_config), *common, "--set", f"output.dir='{small}'",
                 "--set", "train.batch_size=8", "--set", "train.grad_accum=2"]) == 0
    (a,), (b,) = records(big)[0], records(small)[0]
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)


def test_existing_run_dir_is_refused_and_left_alone(tiny_config: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["run", str(tiny_config)]) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    assert main(["run", str(tiny_config), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_config: Path, tmp_path: Path) -> None:
    """A real ENOSPC: the run dir is a 60 MB tmpfs (in a private mount namespace); one checkpoint of the tiny
    model (weights + AdamW moments) takes ~39 MB, so the second write runs out of space half-way."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a private tmpfs")
    run = tmp_path / "run"
    run.mkdir()
    cfg = write_config(tmp_path / "c.toml", tiny_config.read_text(), keep_last="5")
    script = f"mount -t tmpfs -o size=60m none {run} && {sys.executable} -m swiftk run {cfg} --overwrite; " \
             f"rc=$?; echo LEFT:; ls -a {run}/checkpoints; exit $rc"
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "CheckpointError" in out.stderr and "MiB free" in out.stderr and "--resume" in out.stderr
    assert "previous checkpoint (" in out.stderr and "step-000004) is intact" in out.stderr
    left = out.stdout.split("LEFT:")[1].split()
    assert left == [".", "..", "step-000004"]  # no partial step-000008, no .tmp folder left behind


def test_a_plugin_failing_to_give_its_state_stops_the_run_with_its_name(tiny_config: Path, tmp_path: Path,
                                                                        capsys) -> None:
    plugin = tmp_path / "stateful.py"
    plugin.write_text(FAILING_STATE_PLUGIN)
    cfg = write_config(tmp_path / "c.toml", f'plugins = ["{plugin}"]\n' + tiny_config.read_text())
    assert main(["run", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "stateful" in err and "(hook state_dict)" in err and "step 8" in err
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000004"]
    assert load_file(root / "step-000004" / "model.safetensors")


FAILING_STATE_PLUGIN = '''
from swiftk.contracts import hookimpl

saves = 0

@hookimpl
def swiftk_step_end(state):
    return None

def state_dict():
    global saves
    saves += 1
    if saves == 2:
        raise RuntimeError("lost my state")
    return {"saves": saves}
'''


def test_lora_adapter_and_merged_model_load_with_peft_and_transformers(tiny_config: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from swiftk.kernel.config import load_config
    from swiftk.kernel.model import load_model
    from swiftk.kernel.run import seed_everything

    assert main(["run", str(tiny_config), "--set", "train.tuner_strategy='lora'", "--merge"]) == 0
    cfg = load_config(tiny_config)
    seed_everything(cfg.train.seed)  # the random base is rebuilt from the run's seed
    base = load_model(cfg.model, 103, torch.device("cpu"))
    adapted = PeftModel.from_pretrained(base, tmp_path / "run/final").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run/merged").eval()
    ids = torch.tensor([[2, 25, 26, 19, 27, 28, 37]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_plot_writes_curves(tiny_config: Path, tmp_path: Path) -> None:
    assert main(["run", str(tiny_config), "--set", "train.max_steps=3"]) == 0
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_and_help(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "swiftk", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--set", "--resume", "--overwrite", "--merge", "--print-config"):
        assert flag in out.stdout
    assert shutil.which("swiftk") or Path(sys.executable).with_name("swiftk").exists()


INF_GRAD_LOSS = '''
import torch
import torch.nn.functional as F
from swiftk.plugin import register_loss

@register_loss("inf_grad")
def inf_grad(logits, labels):
    # finite value, infinite gradient: sqrt'(0) = inf
    return F.cross_entropy(logits, labels, reduction="none") + (logits - logits.detach()).sum(-1).sqrt()
'''


def test_a_non_finite_gradient_stops_the_run_before_the_update(tiny_config: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "inf.py").write_text(INF_GRAD_LOSS)
    cfg = write_config(tmp_path / "c.toml", f'plugins = ["{tmp_path / "inf.py"}"]\n' + tiny_config.read_text(),
                       save_every="1")
    assert main(["run", str(cfg), "--set", "train.loss_type='inf_grad'"]) == 1
    err = capsys.readouterr().err
    assert "TrainingError: the gradient norm became nan" in err and "the step was not applied" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing NaN was ever saved


def test_resuming_an_earlier_checkpoint_in_place_rewrites_later_ones(tiny_config: Path, tmp_path: Path) -> None:
    assert main(["run", str(tiny_config), "--set", "output.keep_last=5"]) == 0
    full = losses(tmp_path / "run")
    step8 = tmp_path / "run/checkpoints/step-000008/meta.json"
    before = step8.stat().st_mtime_ns
    assert main(["run", str(tiny_config), "--set", "output.keep_last=5",
                 "--resume", str(tmp_path / "run/checkpoints/step-000004")]) == 0
    steps, events = records(tmp_path / "run")
    assert [r.step for r in steps] == list(range(1, 13))  # the replayed steps 5-12 appear once
    assert {r.step: r.loss for r in steps} == full
    assert step8.stat().st_mtime_ns != before
    assert any(isinstance(e, MetricsTruncatedEvent) and e.dropped_records > 0 for e in events)


def test_resume_with_a_different_config_is_refused_naming_the_keys(tiny_config: Path, tmp_path: Path,
                                                                    capsys) -> None:
    assert main(["run", str(tiny_config)]) == 0
    assert main(["run", str(tiny_config), "--resume", "--set", "train.batch_size=8", "--set", "train.lr=0.5"]) == 1
    err = capsys.readouterr().err
    assert "train.batch_size 16 -> 8" in err and "train.lr 0.001 -> 0.5" in err
    assert main(["run", str(tiny_config), "--resume", "--set", "train.max_steps=14"]) == 0  # growing is fine
    assert max(losses(tmp_path / "run")) == 14


def test_overwrite_keeps_the_old_run_when_the_new_config_is_bad(tiny_config: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", str(tiny_config), "--set", "train.max_steps=2"]) == 0
    bad = ["--overwrite", "--set", "train.loss_type='focal'", "--set", "train.loss_config={gamma=-1.0}"]
    assert main(["run", str(tiny_config), *bad]) == 2
    assert "focal needs alpha > 0 and gamma >= 0" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_gradient_checkpointing_trains_full_and_lora(tiny_config: Path, tmp_path: Path) -> None:
    for tuner in ("full", "lora"):
        assert main(["run", str(tiny_config), "--overwrite", "--set", "train.gradient_checkpointing=true",
                     "--set", f"train.tuner_strategy='{tuner}'", "--set", "train.max_steps=2"]) == 0
        assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_timestamped_runs_resume_the_newest(tiny_config: Path, tmp_path: Path) -> None:
    stamped = ["--set", "output.timestamp=true", "--set", "train.max_steps=8"]
    assert main(["run", str(tiny_config), *stamped]) == 0
    (run,) = list((tmp_path / "run").iterdir())
    assert main(["run", str(tiny_config), *stamped[:2], "--set", "train.max_steps=10", "--resume"]) == 0
    assert max(losses(run)) == 10 and list((tmp_path / "run").iterdir()) == [run]


@pytest.mark.parametrize(("override", "message"), [
    ("model.device='cuda:0'", "torch sees no CUDA device"),
    ("model.device='gpu'", "is not a torch device"),
    ("train.precision='fp16'", "Input should be 'auto', 'bf16' or 'fp32'"),
])
def test_bad_device_and_precision_are_config_errors(tiny_config: Path, capsys, override: str, message: str) -> None:
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", str(tiny_config), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_a_partial_launcher_environment_is_refused(tiny_config: Path, monkeypatch, capsys) -> None:
    """WORLD_SIZE without RANK/MASTER_*: not a launcher's rank, so it would train alone (see test_dist.py)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert main(["run", str(tiny_config)]) == 2
    assert "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not" in capsys.readouterr().err
