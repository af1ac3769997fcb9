"""qcore-torchao: quantize transformers models with torchao while loading, and save and load them in transformers'
torchao safetensors format, every stored name and value checked before torchao sees it.

The entry point is :mod:`qcore_torchao.plugin`; :class:`TorchAoConfig` is the ``quantization_config`` it serves.
Importing this package imports neither torch nor torchao.
"""

from qcore_torchao.config import TorchAoConfig

__all__ = ["TorchAoConfig"]
