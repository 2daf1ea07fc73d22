"""Built-in optimizers: factories ``create(param_groups, lr, **config)``."""

from swiftk.plugins.optimizers import torch_optim

__all__ = ["torch_optim"]
