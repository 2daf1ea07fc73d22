"""Built-in optimizers: factories ``create(param_groups, lr, **config)``. Those wrapping an optional library
(bitsandbytes, galore-torch) import it when built, and the native ones compile their C++ when first built,
so the package imports without either."""

from swiftk.plugins.optimizers import adafactor, bnb, galore, native_adamw, projected_adamw, torch_optim

__all__ = ["adafactor", "bnb", "galore", "native_adamw", "projected_adamw", "torch_optim"]
