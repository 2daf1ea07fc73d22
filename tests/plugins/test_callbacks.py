from dataclasses import replace
from pathlib import Path

import pluggy
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import swiftk.contracts.hookspecs
from swiftk.contracts import StepState, lookup
from swiftk.plugins.callbacks.early_stopping import EarlyStopping
from swiftk.plugins.callbacks.grad_norm import GradNormMonitor
from swiftk.plugins.callbacks.tensorboard_log import TensorBoard
from swiftk.plugins.callbacks.throughput import Throughput

STATE = StepState(step=1, max_steps=20, epoch=0, lr=1e-3, tokens_seen=0, elapsed_s=0.0, run_dir=".")


def feed(callback: object, records: list[dict[str, float]]) -> list[dict[str, float] | None]:
    return [callback.swiftk_step_end(state=replace(STATE, step=i + 1), metrics=m) for i, m in enumerate(records)]


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    """patience 2, min_delta 0.1: 1.0 is the best; 0.95 is not better by 0.1 (bad 1), a train-only step
    does not count, 0.85 is (bad 0), then 0.8 and 0.9 are two bad evaluations: stop at the last one."""
    losses = [{"eval_loss": 1.0}, {"eval_loss": 0.95}, {"loss": 0.1}, {"eval_loss": 0.85}, {"eval_loss": 0.8},
              {"eval_loss": 0.9}]
    stops = feed(EarlyStopping(patience=2, min_delta=0.1), losses)
    assert stops == [None] * 5 + [{"stop_training": 1.0}]
    assert feed(EarlyStopping(metric="eval_acc", mode="max", patience=1), [{"eval_acc": 0.5}, {"eval_acc": 0.4}]) \
        == [None, {"stop_training": 1.0}]


def test_early_stopping_resumes_exactly_from_its_state_dict() -> None:
    callback = EarlyStopping(patience=2)
    feed(callback, [{"eval_loss": 1.0}, {"eval_loss": 1.5}])
    resumed = EarlyStopping(patience=2)
    resumed.load_state_dict(callback.state_dict())
    assert resumed.state_dict() == {"best": 1.0, "bad": 1}
    assert feed(resumed, [{"eval_loss": 1.2}]) == [{"stop_training": 1.0}]


def test_grad_norm_monitor_flags_spikes_after_warmup() -> None:
    """warmup 2, factor 5, decay 0.5: norms 1, 20 (no flag, still warming up: ema 10.5), 8 (ema 9.25),
    50 (> 5 * 9.25 = 46.25: a spike; ema 29.625)."""
    out = feed(GradNormMonitor(spike_factor=5, warmup=2, decay=0.5), [{"grad_norm": g} for g in (1, 20, 8, 50)])
    assert [o["grad_norm_spike"] for o in out] == [0.0, 0.0, 0.0, 1.0]
    assert [o["grad_norm_ema"] for o in out] == [1.0, 10.5, 9.25, 29.625]
    assert [o["grad_norm_max"] for o in out] == [1.0, 20.0, 20.0, 50.0]
    assert feed(GradNormMonitor(), [{"grad_norm": float("nan")}])[0]["grad_norm_spike"] == 1.0


def test_grad_norm_monitor_resumes_its_statistics() -> None:
    callback, resumed = GradNormMonitor(warmup=1, decay=0.5), GradNormMonitor(warmup=1, decay=0.5)
    feed(callback, [{"grad_norm": 2.0}, {"grad_norm": 4.0}])
    resumed.load_state_dict(callback.state_dict())
    assert feed(resumed, [{"grad_norm": 16.0}]) == feed(callback, [{"grad_norm": 16.0}])


def test_throughput_averages_tokens_over_the_window() -> None:
    """window 2: steps of 100 tokens in 1 s, 300 in 1 s, then 100 in 4 s. Over the last two: 400 / 5 s."""
    steps = [{"tokens": 100, "tokens_per_s": 100.0}, {"tokens": 300, "tokens_per_s": 300.0},
             {"tokens": 100, "tokens_per_s": 25.0}]
    callback = Throughput(window=2)
    out = feed(callback, steps)
    assert [o["tokens_per_s_avg"] for o in out] == [100.0, 200.0, 80.0]
    assert 1 < out[0]["peak_rss_mib"] < 1e6
    assert ("cuda_max_allocated_mib" in out[0]) == torch.cuda.is_available()
    resumed = Throughput(window=2)
    resumed.load_state_dict(callback.state_dict())
    assert feed(resumed, steps[:1])[0]["tokens_per_s_avg"] == feed(callback, steps[:1])[0]["tokens_per_s_avg"]


def test_tensorboard_writes_each_metric_on_the_main_process_only(tmp_path: Path) -> None:
    main, other = TensorBoard(), TensorBoard()
    for step, loss in ((1, 2.5), (2, 2.0)):
        state = replace(STATE, step=step, run_dir=str(tmp_path / "main"))
        main.swiftk_metrics_logged(state=state, record={"step": step, "loss": loss, "tokens": 64})
        other_state = replace(state, rank=1, run_dir=str(tmp_path / "other"))
        other.swiftk_metrics_logged(state=other_state, record={"loss": loss})
    main.swiftk_run_end(state=state, status="completed")
    events = EventAccumulator(str(tmp_path / "main" / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "tokens"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name", ["early_stopping", "grad_norm_monitor", "throughput", "tensorboard"])
def test_callbacks_run_through_the_hooks(name: str, tmp_path: Path) -> None:
    manager = pluggy.PluginManager("swiftk")
    manager.add_hookspecs(swiftk.contracts.hookspecs)
    manager.register(lookup("callback", name).build(), name=f"callback:{name}")
    state = replace(STATE, run_dir=str(tmp_path))
    extras = manager.hook.swiftk_step_end(state=state, metrics={"loss": 2.0, "grad_norm": 1.0, "eval_loss": 2.0,
                                                                 "tokens": 64, "tokens_per_s": 640.0})
    manager.hook.swiftk_run_end(state=state, status="completed")
    assert all(isinstance(v, float) for extra in extras for v in extra.values())
