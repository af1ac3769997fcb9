"""qcore-gguf: llama.cpp's GGUF files loaded into transformers models with their weights kept in GGUF blocks.

The entry point is :mod:`qcore_gguf.plugin`; :class:`GgufConfig` is the ``quantization_config`` it serves.
Importing this package imports neither torch nor gguf.
"""

from qcore_gguf.config import GgufConfig

__all__ = ["GgufConfig"]
