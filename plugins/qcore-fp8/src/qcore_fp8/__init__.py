"""qcore-fp8: FP8 weights in transformers' FineGrainedFP8 format (``quant_method: fp8``), quantized while loading or
loaded as stored, on CPU and CUDA. The hooks are in :mod:`qcore_fp8.plugin`."""

from qcore_fp8.config import Fp8Config

__all__ = ["Fp8Config"]
