"""swiftk: fine-tune and align LLMs on a microkernel with hot-reloadable, sandboxable plugins."""

__version__ = "0.1.0"
