"""Built-in learning-rate schedules: factories ``create(optimizer, total_steps, warmup_steps, **config)``."""

from swiftk.plugins.schedulers import warmup

__all__ = ["warmup"]
