import math

import pluggy
import pytest
import torch
import torch.nn.functional as F

import swiftk.contracts.hookspecs
from swiftk.contracts import Batch, ModelOutputs, StepState, lookup
from swiftk.plugins.losses.cross_entropy import CrossEntropy
from swiftk.plugins.losses.focal import FocalLoss
from swiftk.plugins.losses.label_smoothing import LabelSmoothedCE
from swiftk.plugins.losses.z_loss import ZLoss

LN2, LN3 = math.log(2), math.log(3)
# Two supervised tokens over a vocabulary of 3, both labelled 0: p_0 = 1/3 in the first row, 2/4 in the second.
LOGITS = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]])
LABELS = torch.tensor([0, 0])


def sft_batch(seed: int = 0) -> tuple[Batch, ModelOutputs]:
    """Two rows of 5 tokens over a vocabulary of 7; a prompt and a padded tail are unscored; the step holds
    11 label tokens (5 here, 6 in another micro-batch)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, 2, 5, 0, -100]])
    logits = (3 * torch.randn(2, 5, 7, generator=gen)).requires_grad_(True)
    return Batch(labels.clamp(min=0), labels, None, num_items_in_batch=11), ModelOutputs(logits)


def test_focal_with_gamma_0_is_cross_entropy_through_the_token_adapter() -> None:
    batch, outputs = sft_batch()
    focal = lookup("loss", "focal").build(alpha=1.0, gamma=0.0).swiftk_loss_compute(batch=batch, outputs=outputs)
    (grad_focal,) = torch.autograd.grad(focal.loss, outputs.logits)
    ce = CrossEntropy().swiftk_loss_compute(batch=batch, outputs=outputs)
    (grad_ce,) = torch.autograd.grad(ce.loss, outputs.logits)
    torch.testing.assert_close(focal.loss, ce.loss)
    torch.testing.assert_close(grad_focal, grad_ce)


def test_focal_down_weights_by_one_minus_p_to_the_gamma() -> None:
    """alpha 0.25, gamma 2: row 0 has p_t = 1/3, so 0.25 * (2/3)^2 * ln 3 = ln 3 / 9;
    row 1 has p_t = 1/2, so 0.25 * (1/2)^2 * ln 2 = ln 2 / 16."""
    losses = FocalLoss(alpha=0.25, gamma=2.0)(LOGITS, LABELS)
    torch.testing.assert_close(losses, torch.tensor([LN3 / 9, LN2 / 16]))


def test_focal_gradient_stays_finite_on_a_certain_token() -> None:
    """Logits [40, 0, 0] give log p_t == 0 in float32; with gamma < 1, d(1 - p_t)^gamma is infinite there."""
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    FocalLoss(gamma=0.5)(logits, torch.tensor([0, 1])).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0].abs().sum() < 1e-6


def test_label_smoothed_ce_matches_torch() -> None:
    logits = 4 * torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 8, 3, 3, 1, 5])
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2, reduction="none")
    torch.testing.assert_close(LabelSmoothedCE(epsilon=0.2)(logits, labels), expected)


def test_z_loss_adds_the_squared_log_normaliser() -> None:
    """z_weight 0.5. Row 0: log Z = ln 3, CE = ln 3, so ln 3 + 0.5 (ln 3)^2 = 1.7021.
    Row 1: Z = 2 + 1 + 1 = 4, log Z = 2 ln 2, CE = 2 ln 2 - ln 2 = ln 2, so ln 2 + 0.5 (2 ln 2)^2 = 1.6540."""
    losses = ZLoss(z_weight=0.5)(LOGITS, LABELS)
    torch.testing.assert_close(losses, torch.tensor([LN3 + 0.5 * LN3**2, LN2 + 2 * LN2**2]))
    torch.testing.assert_close(losses, torch.tensor([1.7021, 1.6540]), atol=1e-4, rtol=0)


def test_losses_run_through_the_hook_and_are_normalised_by_the_step_count() -> None:
    """Through pluggy, as the kernel calls it: the per-token losses are summed and divided by the step's 11."""
    manager = pluggy.PluginManager("swiftk")
    manager.add_hookspecs(swiftk.contracts.hookspecs)
    manager.register(lookup("loss", "z_loss").build(z_weight=1e-2), name="loss:z_loss")
    batch, outputs = sft_batch()
    state = StepState(step=0, max_steps=1, epoch=0, lr=1e-3, tokens_seen=0, elapsed_s=0.0, run_dir=".")
    result = manager.hook.swiftk_loss_compute(batch=batch, outputs=outputs, step=0, state=state)
    mask = batch.labels[:, 1:] != -100  # [2, 4], 5 tokens scored
    per_token = ZLoss(z_weight=1e-2)(outputs.logits[:, :-1][mask], batch.labels[:, 1:][mask])  # [5]
    torch.testing.assert_close(result.loss, per_token.sum() / 11)


@pytest.mark.parametrize("build", [lambda: FocalLoss(gamma=-1.0), lambda: LabelSmoothedCE(epsilon=1.0),
                                   lambda: ZLoss(z_weight=-1.0)])
def test_bad_settings_are_refused(build) -> None:
    with pytest.raises(ValueError):
        build()
