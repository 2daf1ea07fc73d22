"""Built-in losses; each file registers one family."""

from swiftk.plugins.losses import (
    contrastive,
    cpo,
    cross_entropy,
    dpo,
    focal,
    gkd,
    grpo,
    kto,
    label_smoothing,
    native_ce,
    orpo,
    ppo,
    reward,
    z_loss,
)

__all__ = ["contrastive", "cpo", "cross_entropy", "dpo", "focal", "gkd", "grpo", "kto", "label_smoothing", "native_ce",
           "orpo", "ppo", "reward", "z_loss"]
