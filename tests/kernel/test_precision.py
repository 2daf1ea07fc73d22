"""``precision = "auto"`` and ``[model] dtype = "auto"``: bf16 where the device computes it natively, fp32 where it
would be emulated; what the run says and records."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from swiftk.kernel import precision
from swiftk.kernel.cli import main
from swiftk.kernel.config import load_config

CPU = torch.device("cpu")
NATIVE = precision.native_half(torch.bfloat16)  # this CPU: AVX512-BF16 or AMX


def test_auto_is_bf16_only_where_bf16_is_native() -> None:
    assert precision.compute("auto", CPU) == ("bf16" if NATIVE else "fp32")
    assert precision.storage("auto", CPU) == ("bfloat16" if NATIVE else "float32")
    assert precision.torch_dtype("auto", CPU) == (torch.bfloat16 if NATIVE else torch.float32)


def test_what_is_asked_for_is_kept() -> None:
    assert [precision.compute(p, CPU) for p in ("bf16", "fp32")] == ["bf16", "fp32"]
    assert [precision.storage(d, CPU) for d in ("bfloat16", "float16", "float32")] == \
        ["bfloat16", "float16", "float32"]


def test_a_full_fine_tune_keeps_float32_master_weights() -> None:
    assert precision.storage("auto", CPU, full_weights=True) == "float32"


def test_the_console_says_what_auto_picked_and_why() -> None:
    if NATIVE:
        assert precision.describe("auto", "bf16", CPU) == "bf16 (auto)"
    else:
        assert precision.describe("auto", "fp32", CPU) == \
            "fp32 (auto: this CPU has no native bfloat16 (no AVX512-BF16 or AMX))"
        assert "emulated, several times slower than fp32" in precision.describe("bf16", "bf16", CPU)
    assert precision.describe("fp32", "fp32", CPU) == "fp32"


def test_a_run_records_what_auto_resolved_to(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) \
        -> None:
    """The run folder's config.toml (what serve, export and a resume read) holds the precision that trained."""
    assert load_config(tiny_config).train.precision == "auto"  # configs/tiny_sft.toml ships "auto"
    assert main(["run", str(tiny_config), "--set", "train.max_steps=1", "--set", "eval.every=1",
                 "--set", "model.dtype='auto'"]) == 0
    picked = "bf16" if NATIVE else "fp32"
    assert f"precision {picked} (auto" in capsys.readouterr().out
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert saved["train"]["precision"] == picked
    assert saved["model"]["dtype"] == "float32"  # tiny_sft is a full fine-tune: float32 master weights


def test_resolved_replaces_only_auto() -> None:
    cfg = load_config(Path("configs/quickstart.toml"))
    assert (cfg.train.precision, cfg.model.dtype) == ("auto", "auto")
    out = precision.resolved(cfg, CPU, full_weights=False)
    assert (out.train.precision, out.model.dtype) == (("bf16", "bfloat16") if NATIVE else ("fp32", "float32"))
    assert out.train.lr == cfg.train.lr and out.model.model_id == cfg.model.model_id
    assert cfg.train.precision == "auto"  # the loaded config is not changed in place
