"""Shared fixtures: offline environment, the repository root, and tiny configs written into tmp folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs name data by paths relative to the repository root, as the README's commands do."""
    monkeypatch.chdir(REPO)


def write_config(path: Path, text: str, **replace: str) -> Path:
    """Write a config, replacing ``key = value`` lines (``replace={"max_steps": "20"}``)."""
    for key, value in replace.items():
        text, count = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        assert count, f"no line '{key} = ...' in the config"
    path.write_text(text)
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """configs/tiny_sft.toml, shortened to 12 steps (batch 16), writing into tmp_path/run."""
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    return write_config(
        tmp_path / "tiny.toml", text,
        max_steps="12", batch_size="16", save_every="4", every="6", dir=f'"{tmp_path / "run"}"',
    )
