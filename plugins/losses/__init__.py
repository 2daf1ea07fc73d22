"""Built-in losses; each file registers one family."""

from swiftk.plugins.losses import (
    cpo,
    cross_entropy,
    dpo,
    focal,
    kto,
    label_smoothing,
    native_ce,
    orpo,
    reward,
    z_loss,
)

__all__ = ["cpo", "cross_entropy", "dpo", "focal", "kto", "label_smoothing", "native_ce", "orpo", "reward",
           "z_loss"]
