"""Built-in plugins, written exactly as an outside author writes one. Hook plugins (losses, metrics, callbacks...)
import only swiftk.contracts, so they run unchanged in a plugin host; stages run in the kernel's process (they
hold the model) and also read data through the kernel's data library.

Importing this package registers every built-in under its name (``loss_type = "cross_entropy"``,
``optimizer = "adamw"``, ``scheduler = "cosine"``, ``metrics = ["perplexity"]``, ``callbacks = ["early_stopping"]``,
``tuner_strategy = "lora"``, ``stage = "dpo"``, the ``hf`` generator, ``rewards = ["accuracy"]``, the eval tasks of
``swiftk eval --tasks quickstart``...).
"""

from swiftk.plugins import (
    callbacks,
    evals,
    generators,
    losses,
    metrics,
    optimizers,
    rewards,
    schedulers,
    stages,
    tuners,
)

__all__ = ["callbacks", "evals", "generators", "losses", "metrics", "optimizers", "rewards", "schedulers", "stages",
           "tuners"]
