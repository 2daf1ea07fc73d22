"""pytest fixtures for plugin authors: tiny inputs and the conformance check, no kernel and no model.

Loaded by the ``pytest11`` entry point of an installed swiftk (or ``pytest -p swiftk.contracts.testing``)::

    def test_my_loss(swiftk_check, swiftk_batch, swiftk_outputs):
        swiftk_check(lookup("loss", "my_loss"), gamma=2.0)   # fails, listing every finding
        result = MyLoss().swiftk_loss_compute(batch=swiftk_batch, outputs=swiftk_outputs)

pytest loads this module in every session of an environment that has swiftk, so it imports only
``swiftk.contracts`` (torch and pluggy), never the kernel or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from swiftk.contracts.conformance import check, tiny_batch, tiny_outputs, tiny_state
from swiftk.contracts.types import Batch, ModelOutputs, StepState


@pytest.fixture
def swiftk_batch() -> Batch:
    """Two right-padded rows of six tokens, vocabulary 11 (``conformance.tiny_batch()``)."""
    return tiny_batch()


@pytest.fixture
def swiftk_outputs(swiftk_batch: Batch) -> ModelOutputs:
    """Random ``[2, 6, 11]`` logits for ``swiftk_batch``: a leaf that requires grad."""
    return tiny_outputs(swiftk_batch)


@pytest.fixture
def swiftk_state(tmp_path: Path) -> StepState:
    """Step 0 of a 10-step run whose run directory is ``tmp_path``."""
    return tiny_state(tmp_path)


@pytest.fixture
def swiftk_check() -> Callable[..., None]:
    """``swiftk_check(plugin_or_spec, **config)``: fail the test, listing every conformance finding."""

    def run(plugin_or_spec: object, /, **config: Any) -> None:
        findings = check(plugin_or_spec, config)
        if findings:
            lines = "\n".join(f"  - {finding}" for finding in findings)
            pytest.fail(f"{len(findings)} conformance finding(s):\n{lines}", pytrace=False)

    return run
