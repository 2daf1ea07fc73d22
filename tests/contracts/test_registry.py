import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from swiftk.contracts import Batch, ModelOutputs, PluginRegistryError, lookup, register_loss, registered
from swiftk.contracts.registry import TokenLoss, has_hookimpls

PLUGIN = """
from swiftk.contracts import register_loss

@register_loss("dup_loss")
def dup(logits, labels):
    return logits.sum() * 0
"""


def load(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_same_name_from_two_files_is_an_error_naming_both(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(PLUGIN)
    (tmp_path / "b.py").write_text(PLUGIN)
    load(tmp_path / "a.py")
    load(tmp_path / "a.py")  # re-importing the same file (a reload) just replaces the entry
    with pytest.raises(PluginRegistryError) as err:
        load(tmp_path / "b.py")
    assert "a.py" in str(err.value) and "b.py" in str(err.value)


def test_lookup_suggests_the_closest_name() -> None:
    import swiftk.plugins  # noqa: F401

    with pytest.raises(PluginRegistryError, match="did you mean 'cross_entropy'"):
        lookup("loss", "cross_entropi")
    assert {"adamw", "sgd"} <= {s.name for s in registered("optimizer")}


def test_a_module_loss_is_normalised_by_the_step_token_count() -> None:
    """A loss returning the mean over its N tokens is scaled back to a sum and divided by the step's count,
    so it equals per-token sum / num_items_in_batch: here 2 tokens of loss 3 each over 4 step tokens = 1.5."""

    @register_loss("test_mean_three")
    class MeanThree(torch.nn.Module):
        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            assert logits.shape == (2, 5) and labels.tolist() == [1, 2]
            return (logits.sum(-1) * 0 + 3).mean()

    plugin = lookup("loss", "test_mean_three").build()
    assert isinstance(plugin, TokenLoss) and has_hookimpls(plugin)
    labels = torch.tensor([[-100, 1, 2]])
    batch = Batch(labels.clamp(min=0), labels, None, num_items_in_batch=4)
    result = plugin.swiftk_loss_compute(batch=batch, outputs=ModelOutputs(torch.zeros(1, 3, 5, requires_grad=True)))
    assert result.loss.item() == pytest.approx(1.5)


def test_config_signature_skips_the_arguments_the_kernel_passes() -> None:
    import swiftk.plugins  # noqa: F401

    adamw = lookup("optimizer", "adamw").config_signature()
    assert "param_groups" not in adamw.parameters and "lr" not in adamw.parameters
    assert adamw.parameters["eps"].default == pytest.approx(1e-8)
    assert list(lookup("scheduler", "cosine").config_signature().parameters) == ["min_lr_ratio"]
    assert inspect.signature(lookup("loss", "cross_entropy").target).parameters["label_smoothing"]
