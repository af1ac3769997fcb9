"""qcore-hqq: the qcore backend for ``quant_method: "hqq"`` (Half-Quadratic Quantization with the hqq library).

The hooks live in :mod:`qcore_hqq.plugin` (the ``qcore`` entry point); the config in :mod:`qcore_hqq.config`. Neither
this package nor those modules import torch or hqq; :mod:`qcore_hqq.layers` and :mod:`qcore_hqq.kernels` do, and
are imported by the hooks when a model is loaded.
"""

from __future__ import annotations

from qcore_hqq.config import HqqConfig

__all__ = ["HqqConfig"]
