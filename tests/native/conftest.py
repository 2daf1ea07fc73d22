"""Native plugins compile once per source and toolchain; the tests share one build cache under build/, and
the first test that needs one compiles all of them, two at a time (each build is single-threaded)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("SWIFTK_NATIVE_CACHE", str(REPO / "build" / "native-cache"))
BUILTINS = ("adamw", "projected_adamw", "fused_ce")
SOURCES = [REPO / "native" / f"{stem}.cpp" for stem in BUILTINS] + [REPO / "configs" / "plugins" / "lion.cpp"]


@pytest.fixture(scope="session")
def built() -> dict:
    from swiftk.native import build, builtin

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda source: build(source, progress=None), SOURCES))
    return {stem: builtin(stem) for stem in BUILTINS}


@pytest.fixture(scope="session")
def adamw(built):
    return built["adamw"]


@pytest.fixture(scope="session")
def projected(built):
    return built["projected_adamw"]


@pytest.fixture(scope="session")
def fused_ce(built):
    return built["fused_ce"]
