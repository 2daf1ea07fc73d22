import math

import torch

from swiftk.contracts import Batch, ModelOutputs
from swiftk.plugins.losses.cross_entropy import CrossEntropy


def test_cross_entropy_sums_supervised_tokens_and_divides_by_the_step_count() -> None:
    """Two sequences of 3 tokens, vocab 2. After the shift, the scored positions are
    seq0 t0 -> label 1 with logits [0, ln 3]: p = 3/4, loss ln(4/3)
    seq0 t1 -> label 0 with logits [0, 0]:    p = 1/2, loss ln 2
    seq1 t1 -> label 1 with logits [ln 3, 0]: p = 1/4, loss ln 4
    seq1 t0 is prompt (label -100). Sum = ln(32/3); the step has 6 label tokens in all (another
    micro-batch holds the other 3), so the loss is ln(32/3) / 6."""
    ln3 = math.log(3)
    logits = torch.tensor([[[0, ln3], [0, 0], [9, 9]], [[5, -5], [ln3, 0], [9, 9]]], requires_grad=True)
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    batch = Batch(input_ids=labels.clamp(min=0), labels=labels, attention_mask=None, num_items_in_batch=6)
    result = CrossEntropy().swiftk_loss_compute(batch=batch, outputs=ModelOutputs(logits))
    torch.testing.assert_close(result.loss, torch.tensor(math.log(32 / 3) / 6))
    result.loss.backward()
    assert logits.grad is not None and logits.grad[:, 2].abs().sum() == 0  # last position scores nothing
    assert logits.grad[1, 0].abs().sum() == 0  # nor does the prompt


def test_label_smoothing_is_validated() -> None:
    try:
        CrossEntropy(label_smoothing=1.5)
    except ValueError as exc:
        assert "label_smoothing" in str(exc)
    else:
        raise AssertionError("label_smoothing=1.5 was accepted")
