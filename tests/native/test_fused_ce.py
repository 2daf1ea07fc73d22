"""native_cross_entropy / native_focal: values and gradients against torch's and the Python focal loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swiftk.contracts import IGNORE_INDEX, Batch, ModelOutputs
from swiftk.native import native_loss
from swiftk.plugins.losses.cross_entropy import CrossEntropy
from swiftk.plugins.losses.focal import FocalLoss
from swiftk.plugins.losses.native_ce import NativeCrossEntropy, NativeFocal


def settings(gamma: float = 0.0, alpha: float = 1.0) -> dict[str, float]:
    return {"gamma": gamma, "alpha": alpha, "ignore_index": float(IGNORE_INDEX)}


def reference(logits: torch.Tensor, labels: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    if gamma == 0.0 and alpha == 1.0:
        return F.cross_entropy(logits, labels, reduction="none")
    return FocalLoss(alpha=alpha, gamma=gamma)(logits, labels)


@pytest.mark.parametrize("gamma, alpha", [(0.0, 1.0), (2.0, 0.25), (0.5, 1.0)])
@pytest.mark.parametrize("V", [1000, 17])  # a row of whole vectors plus a tail, and one shorter than a vector
def test_value_and_gradient_match_the_python_loss(fused_ce, gamma: float, alpha: float, V: int) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(96, V, generator=generator) * 4).requires_grad_()
    labels = torch.randint(0, V, (96,), generator=generator)
    labels[::7] = IGNORE_INDEX
    weights = torch.randn(96, generator=generator)
    ours = native_loss(fused_ce, logits, labels, settings(gamma, alpha))
    (ours * weights).sum().backward()
    grad, logits.grad = logits.grad, None
    keep = labels != IGNORE_INDEX
    theirs = reference(logits[keep], labels[keep], gamma, alpha)
    (theirs * weights[keep]).sum().backward()
    torch.testing.assert_close(ours[keep], theirs, rtol=0, atol=1e-5)
    assert torch.equal(ours[~keep], torch.zeros(int((~keep).sum())))
    torch.testing.assert_close(grad, logits.grad, rtol=0, atol=1e-5)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))


def test_bfloat16_logits_are_read_without_a_float32_copy(fused_ce) -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 500, generator=generator).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 500, (32,), generator=generator)
    ours = native_loss(fused_ce, logits, labels, settings())
    ours.sum().backward()
    assert ours.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    wide = logits.detach().float().requires_grad_()
    theirs = F.cross_entropy(wide, labels, reduction="none")
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # computed in float32 from the same inputs
    torch.testing.assert_close(logits.grad.float(), wide.grad, rtol=2**-7, atol=1e-6)  # one bf16 rounding


def test_a_label_outside_the_vocabulary_is_a_clear_error(fused_ce) -> None:
    with pytest.raises(RuntimeError, match=r"label 9 at row 1 is outside \[0, 5\)"):
        native_loss(fused_ce, torch.randn(2, 5), torch.tensor([0, 9]), settings())


def test_the_loss_plugins_give_the_python_plugins_loss_and_gradient() -> None:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 50, (3, 9), generator=generator)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX  # the prompt
    batch = Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                  num_items_in_batch=int((labels[:, 1:] != IGNORE_INDEX).sum()) * 2)  # as if 2 micro-batches
    for ours, theirs in ((NativeCrossEntropy(), CrossEntropy()), (NativeFocal(gamma=2.0), None)):
        grads = []
        for plugin in (ours, theirs):
            logits = torch.randn(3, 9, 50, generator=torch.Generator().manual_seed(3), requires_grad=True)
            if plugin is None:  # the Python focal loss through the kernel's per-token adapter
                from swiftk.contracts.registry import lookup

                plugin = lookup("loss", "focal").build(gamma=2.0)
            loss = plugin.swiftk_loss_compute(batch=batch, outputs=ModelOutputs(logits=logits)).loss
            loss.backward()
            grads.append((loss.detach(), logits.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-6)
