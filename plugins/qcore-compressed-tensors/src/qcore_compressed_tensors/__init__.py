"""qcore-compressed-tensors: quantize transformers models into compressed-tensors (vLLM's native format) while
loading, and load compressed-tensors / llm-compressor checkpoints with their weights kept compressed.

The entry point is :mod:`qcore_compressed_tensors.plugin`; :class:`CompressedTensorsConfig` is the
``quantization_config`` it serves. Importing this package imports neither torch nor compressed-tensors.
"""

from qcore_compressed_tensors.config import CompressedTensorsConfig

__all__ = ["CompressedTensorsConfig"]
