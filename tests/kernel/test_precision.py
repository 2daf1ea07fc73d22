"""``precision = "auto"`` and ``[model] dtype = "auto"``: bf16 where the device computes it natively, fp32 where it
would be emulated; what the run says and records. The hardware question (``native_bf16``) is answered both ways
here, so each branch is checked on any CPU; the last test asks this machine itself."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from swiftk.kernel import precision
from swiftk.kernel.cli import main
from swiftk.kernel.config import load_config

CPU = torch.device("cpu")
EMULATED = "this CPU has no native bfloat16 (no AVX512-BF16 or AMX)"


@pytest.fixture(params=[True, False], ids=["native", "emulated"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether the device computes bf16 natively, as the resolution functions are told."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: request.param)
    return bool(request.param)


def test_auto_is_bf16_only_where_bf16_is_native(native: bool) -> None:
    assert precision.compute("auto", CPU) == ("bf16" if native else "fp32")
    assert precision.storage("auto", CPU) == ("bfloat16" if native else "float32")
    assert precision.torch_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)


def test_what_is_asked_for_is_kept(native: bool) -> None:
    assert [precision.compute(p, CPU) for p in ("bf16", "fp32")] == ["bf16", "fp32"]
    assert [precision.storage(d, CPU) for d in ("bfloat16", "float16", "float32")] == \
        ["bfloat16", "float16", "float32"]


def test_a_full_fine_tune_keeps_float32_master_weights(native: bool) -> None:
    assert precision.storage("auto", CPU, full_weights=True) == "float32"


def test_the_console_says_what_auto_picked_and_why(native: bool) -> None:
    if native:
        assert precision.describe("auto", "bf16", CPU) == "bf16 (auto)"
        assert precision.describe("bf16", "bf16", CPU) == "bf16"
    else:
        assert precision.describe("auto", "fp32", CPU) == f"fp32 (auto: {EMULATED})"
        assert precision.describe("bf16", "bf16", CPU).startswith(f"bf16 ({EMULATED}: its matmuls are emulated")
    assert precision.describe("fp32", "fp32", CPU) == "fp32"


def test_resolved_replaces_only_auto(native: bool) -> None:
    cfg = load_config(Path("configs/quickstart.toml"))
    assert (cfg.train.precision, cfg.model.dtype) == ("auto", "auto")
    out = precision.resolved(cfg, CPU, full_weights=False)
    assert (out.train.precision, out.model.dtype) == (("bf16", "bfloat16") if native else ("fp32", "float32"))
    assert out.train.lr == cfg.train.lr and out.model.model_id == cfg.model.model_id
    assert cfg.train.precision == "auto"  # the loaded config is not changed in place
    assert precision.resolved(cfg, CPU, full_weights=True).model.dtype == "float32"


def test_a_run_records_what_auto_resolved_to(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             native: bool) -> None:
    """The run folder's config.toml (what serve, export and a resume read) holds the precision that trained."""
    assert load_config(tiny_config).train.precision == "auto"  # configs/tiny_sft.toml ships "auto"
    assert main(["run", str(tiny_config), "--set", "train.max_steps=1", "--set", "eval.every=1",
                 "--set", "model.dtype='auto'"]) == 0
    picked = "bf16" if native else "fp32"
    assert f"precision {picked} (auto" in capsys.readouterr().out
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert saved["train"]["precision"] == picked
    assert saved["model"]["dtype"] == "float32"  # tiny_sft is a full fine-tune: float32 master weights


def test_this_machine_is_asked_through_mkldnn() -> None:
    assert precision.native_bf16(CPU) == precision.native_half(torch.bfloat16) == \
        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert precision.native_bf16(torch.device("meta")) is False
