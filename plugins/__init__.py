"""Built-in plugins, written exactly as an outside author writes one: they import only swiftk.contracts.

Importing this package registers every built-in under its name (``loss_type = "cross_entropy"``,
``optimizer = "adamw"``, ``scheduler = "cosine"``...).
"""

from swiftk.plugins import losses, optimizers, schedulers

__all__ = ["losses", "optimizers", "schedulers"]
