"""qcore-gptq: GPTQ and AWQ checkpoints for qcore on any device, and GPTQ quantization one decoder block at a time.

The entry point is :mod:`qcore_gptq.plugin`; :class:`GptqConfig` and :class:`AwqConfig` are the
``quantization_config`` values it serves. Importing this package imports neither torch nor any quantization library.
"""

from qcore_gptq.config import AwqConfig, GptqConfig

__all__ = ["GptqConfig", "AwqConfig"]
