"""Native plugins in a run: native_adamw reproduces adamw, native_cross_entropy reproduces cross_entropy, and a
user's C++ optimizer file named in `plugins` is built and trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftk.contracts.events import read, steps
from swiftk.kernel.cli import main

from ..conftest import write_config

pytestmark = pytest.mark.usefixtures("built")  # compiled beside the other native tests' plugins


def losses(run_dir: Path) -> list[float]:
    return [r.loss for r in steps(read(run_dir / "metrics.jsonl"))]


def run(tiny_config: Path, tmp_path: Path, name: str, *overrides: str) -> list[float]:
    args = ["run", str(tiny_config), "--set", f"output.dir='{tmp_path / name}'", "--set", "train.max_steps=8",
            "--set", "eval.every=8", "--set", "output.save_every=8"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    return losses(tmp_path / name)


def test_native_adamw_reproduces_the_adamw_run(tiny_config: Path, tmp_path: Path) -> None:
    """In fp32: the optimizer's state and update are fp32 under either precision, and under bf16 autocast a
    one-ulp difference in one weight can flip a bf16 rounding and move one step's loss by ~3e-4 (seen on CI)."""
    reference = run(tiny_config, tmp_path, "adamw", "train.precision='fp32'")
    ours = run(tiny_config, tmp_path, "native", "train.optimizer='native_adamw'", "train.precision='fp32'")
    assert len(ours) == len(reference) == 8
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 1e-5, (ours, reference)


def test_native_cross_entropy_reproduces_the_cross_entropy_run(tiny_config: Path, tmp_path: Path) -> None:
    """In fp32, as the AdamW test: under bf16 autocast (``precision = "auto"`` on a CPU with AVX512-BF16) the two
    sums' float rounding, carried through 8 steps, moved a loss by 1.1e-3."""
    reference = run(tiny_config, tmp_path, "ce", "train.precision='fp32'")
    ours = run(tiny_config, tmp_path, "native_ce", "train.loss_type='native_cross_entropy'", "train.precision='fp32'")
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 1e-3, (ours, reference)


def test_a_user_cpp_optimizer_from_the_config_trains(tiny_config: Path, tmp_path: Path, repo: Path) -> None:
    config = write_config(tmp_path / "lion.toml", 'plugins = ["native:configs/plugins/lion.cpp"]\n' +
                          tiny_config.read_text())
    got = run(config, tmp_path, "lion", "train.optimizer='native_lion'", "train.lr=3e-4",
              "train.optimizer_config={}")  # the tiny config's AdamW betas are not Lion's
    assert got[-1] < got[0] - 0.5, got


def test_a_bad_native_plugin_argument_is_a_config_error(tiny_config: Path, tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "lion.toml", 'plugins = ["native:configs/plugins/lion.cpp"]\n' +
                          tiny_config.read_text())
    code = main(["run", str(config), "--set", "train.optimizer='native_lion'",
                 "--set", "train.optimizer_config={ beta3 = 0.5 }"])
    assert code == 2
    err = capsys.readouterr().err
    assert "beta3" in err and "native_lion" in err, err
    assert not (tmp_path / "run").exists()


def test_a_native_adamw_run_resumes_exactly(tiny_config: Path, tmp_path: Path) -> None:
    full = run(tiny_config, tmp_path, "full", "train.optimizer='native_adamw'", "output.save_every=4",
               "output.keep_last=3")
    args = ["run", str(tiny_config), "--set", f"output.dir='{tmp_path / 'resumed'}'", "--set", "train.max_steps=8",
            "--set", "eval.every=8", "--set", "output.save_every=4", "--set", "train.optimizer='native_adamw'",
            "--resume", str(tmp_path / "full/checkpoints/step-000004")]
    assert main(args) == 0
    assert losses(tmp_path / "resumed") == full[4:]


def test_a_prebuilt_library_in_plugins_is_loaded_and_registered(tiny_config: Path, tmp_path: Path, repo: Path,
                                                                 capsys) -> None:
    from swiftk.native import build

    library = build(repo / "configs" / "plugins" / "lion.cpp", progress=None)  # the session's cached build
    config = write_config(tmp_path / "lion.toml", f'plugins = ["{library}"]\n' + tiny_config.read_text())
    code = main(["run", str(config), "--set", "train.optimizer='native_lion'",
                 "--set", "train.optimizer_config={ beta3 = 0.5 }"])
    assert code == 2  # got as far as checking native_lion's arguments: the .so was loaded and registered
    assert "native_lion" in capsys.readouterr().err
