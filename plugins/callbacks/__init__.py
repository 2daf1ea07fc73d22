"""Built-in callbacks: hook classes on ``swiftk_step_end`` that add metrics or stop the run."""

from swiftk.plugins.callbacks import early_stopping, grad_norm, tensorboard_log, throughput

__all__ = ["early_stopping", "grad_norm", "tensorboard_log", "throughput"]
