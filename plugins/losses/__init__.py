"""Built-in losses; each file registers one family."""

from swiftk.plugins.losses import cross_entropy, focal, label_smoothing, z_loss

__all__ = ["cross_entropy", "focal", "label_smoothing", "z_loss"]
