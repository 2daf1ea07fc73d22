"""Built-in eval metrics: hook classes that accumulate in ``swiftk_eval_batch`` / ``swiftk_eval_predictions``
and report in ``swiftk_eval_end``."""

from swiftk.plugins.metrics import text, token, vision

__all__ = ["text", "token", "vision"]
