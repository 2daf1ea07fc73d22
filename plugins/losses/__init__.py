"""Built-in losses; each file registers one family."""

from swiftk.plugins.losses import cross_entropy

__all__ = ["cross_entropy"]
