"""Built-in generators: ``hf`` (in-process, over the live model) and ``vllm`` (a client for a vLLM engine in its own
environment and process; ``vllm_engine.py`` is that engine's script). Each registers with ``register_generator``."""

from swiftk.plugins.generators import hf, vllm
from swiftk.plugins.generators.vllm import VLLMGenerator

__all__ = ["VLLMGenerator", "hf", "vllm"]
