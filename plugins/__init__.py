"""Built-in plugins, written exactly as an outside author writes one: they import only swiftk.contracts.

Importing this package registers every built-in under its name (``loss_type = "cross_entropy"``,
``optimizer = "adamw"``, ``scheduler = "cosine"``, ``metrics = ["perplexity"]``, ``callbacks = ["early_stopping"]``,
``tuner_strategy = "lora"``, the ``hf`` generator...).
"""

from swiftk.plugins import callbacks, generators, losses, metrics, optimizers, schedulers, tuners

__all__ = ["callbacks", "generators", "losses", "metrics", "optimizers", "schedulers", "tuners"]
