"""Every dataset test runs offline with empty HF caches and its own swiftk cache."""

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def offline_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("SWIFTK_CACHE", str(tmp_path / "swiftk"))
    for variable in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path / "hf"
