"""The parallel engines by name, and the ms-swift style [device] table written onto [distributed]: the method and
GPU count it stands for, the conflicts it refuses, and GPUs asked for on a machine that has fewer (or none)."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from swiftk.contracts.engines import ParallelEngine
from swiftk.kernel import launch, parallel
from swiftk.kernel.config import DistributedConfig, load_config
from swiftk.kernel.dist import DistInfo, DistributedError
from swiftk.kernel.errors import ConfigError
from swiftk.kernel.parallel.config import apply_device, say_once
from swiftk.kernel.parallel.none import OneProcess

from ..conftest import REPO

TOML = """
[model]
model_id = "data/tiny_tokenizer"
[data]
train_file = "data/synthetic/addition_train.jsonl"
[output]
dir = "runs/unused"
"""


def cfg_with(tmp_path: Path, extra: str, name: str = "c.toml") -> typing.Any:
    (tmp_path / name).write_text(TOML + extra)
    return load_config(tmp_path / name)


@pytest.fixture(autouse=True)
def machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, not started by a launcher (a test says otherwise)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    say_once.cache_clear()


def gpus(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(names))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])


# ------------------------------------------------------------------------------------------ the engine table


def test_every_backend_has_an_engine_that_meets_the_contract() -> None:
    for name in [n for n in parallel.ENGINES if n != "none"]:  # every engine is a [distributed] backend
        assert DistributedConfig(backend=name).backend == name
    with pytest.raises(ValueError, match="no parallel engine named 'fdsp'; did you mean 'fsdp'"):
        DistributedConfig(backend="fdsp")
    for name in parallel.ENGINES:
        engine = parallel.engine_class(name)(DistInfo(), DistributedConfig())
        assert engine.name == name and isinstance(engine, ParallelEngine), name


def test_an_unknown_engine_is_named_with_suggestions() -> None:
    with pytest.raises(DistributedError, match=r"no parallel engine named 'fsdp3'; did you mean 'fsdp'\? "
                                               r"\(engines: none, ddp, fsdp, deepspeed, tp, pp\)"):
        parallel.engine_class("fsdp3")


def test_one_process_runs_when_no_process_group_is_up() -> None:
    """``[distributed] backend`` only counts when several ranks run: one process is the plain PyTorch engine."""
    engine = parallel.create(DistributedConfig(backend="fsdp"), DistInfo())
    assert type(engine) is OneProcess and not engine.sharded


def test_the_one_process_engine_is_plain_pytorch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, engine = torch.nn.Linear(3, 2), OneProcess()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.backward(model(torch.ones(1, 3)).sum())
    norm = engine.clip_grad_norm(list(model.parameters()), max_norm=None)
    assert norm == pytest.approx(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
    before = engine.full_weights(model)
    assert engine.step(optimizer, norm) == norm
    engine.zero_grad(optimizer)
    assert all(p.grad is None for p in model.parameters())
    engine.load(model, optimizer, before, engine.optimizer_state(model, optimizer), tmp_path)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------ [device]


def test_ddp_on_two_gpus_is_two_processes_here_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.yaml").write_text("model: {model_id: data/tiny_tokenizer}\n"
                                     "data: {train_file: data/synthetic/addition_train.jsonl}\n"
                                     "output: {dir: runs/unused}\n"
                                     "device: {parallel_method: ddp, num_gpus: 2}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert apply_device(cfg) == [] and apply_device(cfg) == []  # the second time changes nothing, says nothing
    assert (cfg.distributed.backend, cfg.distributed.num_processes) == ("ddp", 2)
    assert launch.wanted(cfg.distributed)
    note = "no CUDA device: running 2 CPU processes (gloo) for [device] num_gpus = 2"
    assert capsys.readouterr().err.count(note) == 1


@pytest.mark.parametrize(("method", "expected"), [
    ("fsdp2", {"backend": "fsdp"}),
    ("ZeRO3", {"backend": "deepspeed", "zero_stage": 3}),
    ("zero3_offload", {"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_param": True}),
    ("none", {"num_processes": 1}),
])
def test_each_parallel_method_sets_its_distributed_keys(method: str, expected: dict, tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path, f'[device]\nparallel_method = "{method}"\n')
    assert apply_device(cfg) == []
    assert {key: getattr(cfg.distributed, key) for key in expected} == expected


def test_device_and_distributed_that_disagree_are_refused_naming_both(tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path, '[device]\nparallel_method = "fsdp2"\nnum_gpus = 4\n'
                             '[distributed]\nbackend = "ddp"\nnum_processes = 2\n')
    assert parallel.config_problems(cfg) == [
        "[device] parallel_method = 'fsdp2' asks for [distributed] backend = 'fsdp', but [distributed] backend = "
        "'ddp': set one of the two",
        "[device] num_gpus = 4 asks for [distributed] num_processes = 4, but [distributed] num_processes = 2: set "
        "one of the two"]
    assert cfg.distributed.num_processes == 2  # left as it was
    agreeing = cfg_with(tmp_path, '[device]\nnum_gpus = 2\n[distributed]\nnum_processes = 2\n', "d.toml")
    assert apply_device(agreeing) == []


def test_more_gpus_than_this_machine_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_with(tmp_path, '[device]\nparallel_method = "ddp"\nnum_gpus = 4\n')
    gpus(monkeypatch, "NVIDIA H200")
    assert apply_device(cfg) == ["[device] num_gpus = 4: this machine has 1 CUDA device (NVIDIA H200); "
                                 "set num_gpus <= 1"]
    gpus(monkeypatch, "NVIDIA H200", "NVIDIA H200", "NVIDIA H200", "NVIDIA H200")
    assert apply_device(cfg) == [] and cfg.distributed.num_processes == 4


def test_one_process_methods_refuse_several_gpus(tmp_path: Path) -> None:
    (problem,) = apply_device(cfg_with(tmp_path, '[device]\nparallel_method = "none"\nnum_gpus = 2\n'))
    assert "parallel_method = 'none' runs one process but num_gpus = 2" in problem


@pytest.mark.parametrize(("method", "message"), [
    ("megatron", "'megatron' (Megatron-Core tensor + pipeline parallelism) is not built yet"),
    ("fdsp", "unknown parallel method 'fdsp'; did you mean 'fsdp'"),
])
def test_unknown_and_unbuilt_methods_are_config_errors(method: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[device\] parallel_method: ") as caught:
        cfg_with(tmp_path, f'[device]\nparallel_method = "{method}"\n')
    assert message in str(caught.value)


def test_swiftk_run_reports_the_conflict_before_launching(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TOML + '[device]\nnum_gpus = 2\n[distributed]\nnum_processes = 3\n')
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "swiftk", "run", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "[device] num_gpus = 2 asks for [distributed] num_processes = 2, but [distributed] num_processes = 3" \
        in done.stderr and "processes on node" not in done.stdout, done.stdout + done.stderr
