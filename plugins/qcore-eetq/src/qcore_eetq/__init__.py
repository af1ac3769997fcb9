"""qcore-eetq: EETQ int8 weight-only quantization for qcore, on CPU and CUDA, with or without the eetq package.

The entry point is :mod:`qcore_eetq.plugin`; :class:`EetqConfig` is the ``quantization_config`` it serves.
Importing this package imports neither torch nor eetq.
"""

from qcore_eetq.config import EetqConfig

__all__ = ["EetqConfig"]
