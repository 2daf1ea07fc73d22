"""The same loss in the kernel and in a host: the same per-step losses and the same final weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import assert_clean, host_config, run, steps


@pytest.mark.parametrize("module, loss", [("swiftk.plugins.losses.cross_entropy", "cross_entropy"),
                                          ("swiftk.plugins.losses.focal", "focal")])
def test_a_loss_in_a_host_trains_exactly_like_in_process(tmp_path: Path, module: str, loss: str) -> None:
    remote = host_config(tmp_path / "remote", module, loss=loss, steps=6, save_every=100, key="module")
    local = host_config(tmp_path / "local", module, loss=loss, steps=6, save_every=100, key="module")
    local.write_text(local.read_text().replace('isolation = "process"', 'isolation = "inline"'))
    assert run(remote) == 0 and run(local) == 0
    remote_losses, local_losses = steps(tmp_path / "remote" / "run"), steps(tmp_path / "local" / "run")
    assert sorted(remote_losses) == list(range(1, 7))
    for step, value in local_losses.items():
        assert remote_losses[step] == pytest.approx(value, rel=1e-5)
    a = load_file(tmp_path / "remote" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "local" / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert_clean()


def test_configs_host_loss_trains_like_configs_custom_loss(tmp_path: Path) -> None:
    for name in ("custom_loss", "host_loss"):
        assert run(Path(f"configs/{name}.toml"), "--set", "train.max_steps=4", "--set", "eval.every=100",
                   "--set", f'output.dir="{tmp_path / name}"') == 0
    inline, remote = steps(tmp_path / "custom_loss"), steps(tmp_path / "host_loss")
    assert sorted(remote) == [1, 2, 3, 4]
    assert all(remote[s] == pytest.approx(inline[s], rel=1e-5) for s in inline)
    assert_clean()
