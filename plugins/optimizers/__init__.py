"""Built-in optimizers: factories ``create(param_groups, lr, **config)``. Those wrapping an optional library
(bitsandbytes, galore-torch) import it when built, so the package imports without them."""

from swiftk.plugins.optimizers import adafactor, bnb, galore, torch_optim

__all__ = ["adafactor", "bnb", "galore", "torch_optim"]
