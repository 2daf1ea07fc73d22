"""A loss to edit while training runs (configs/live_loss.toml): change it, save, and the next step uses it.

Try: set ``SCALE = 2.0`` and save; the logged loss doubles from the step after the ``reloaded`` line. Then
break it (delete a parenthesis) and save: the edit is rejected with file:line and the old code keeps
running. Then fix it and save again.
"""

import torch.nn.functional as F

from swiftk.contracts import LossResult, hookimpl, register_loss, supervised

SCALE = 1.0
LABEL_SMOOTHING = 0.0


@register_loss("live_loss")
class LiveLoss:
    """Token cross-entropy, scaled and optionally label-smoothed: the two knobs to play with."""

    @hookimpl
    def swiftk_loss_compute(self, batch, outputs):
        logits, labels = supervised(batch, outputs)  # [N, V], [N]: the supervised tokens after the shift
        ce = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=LABEL_SMOOTHING)
        ce = ce / batch.num_items_in_batch  # normalised by the whole step's label tokens
        return LossResult(SCALE * ce, {"ce": float(ce.detach())})
