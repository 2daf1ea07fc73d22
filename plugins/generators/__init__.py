"""Built-in generators: ``hf`` (in-process, over the live model). Each registers with ``register_generator``."""

from swiftk.plugins.generators import hf

__all__ = ["hf"]
