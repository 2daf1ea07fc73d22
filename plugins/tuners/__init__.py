"""Built-in tuners (``[train] tuner_strategy``), one module per family: full (full, galore), freeze, lora (lora,
dora, qlora). Each owns its [train] keys as a pydantic model; importing this package registers all six."""

from swiftk.plugins.tuners import freeze, full, lora

__all__ = ["freeze", "full", "lora"]
