"""qcore-bnb: bitsandbytes 4-bit (nf4/fp4) and 8-bit (LLM.int8()) quantization for qcore.

qcore finds the plugin through the ``qcore`` entry point (:mod:`qcore_bnb.plugin`); :class:`BnbConfig` is the
``quant_method: bitsandbytes`` config, the dict transformers writes as ``quantization_config``. Importing this
package imports neither torch nor bitsandbytes.
"""

from qcore_bnb.config import BnbConfig

__all__ = ["BnbConfig"]
