"""What each benchmark method loads, with qcore and with the transformers load it is compared against.

Torch-free: ``run.py`` plans its subprocesses from these definitions, and ``worker.py`` turns them into real loads.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Method", "METHODS", "REFERENCES"]

_NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": "bfloat16"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the comparison: a qcore load and the transformers load (``reference``) it is measured against."""

    name: str
    #: The ``quantization_config`` qcore gets; ``None`` loads the checkpoint as it is stored.
    qcore_config: dict | None
    #: Key into :data:`REFERENCES`: the transformers load of the same checkpoint.
    reference: str
    #: The backend library a worker imports (when installed) before the after-import RSS is taken, so that its
    #: import is not counted as load.
    library: str | None
    #: Loads the qcore-saved pre-quantized checkpoint instead of the bf16 one.
    pre_quantized: bool = False

    @property
    def same_backend(self) -> bool:
        """Whether transformers runs the same quantized kernels (so load, speed and logits should match)."""
        return self.reference != "bf16" or self.qcore_config is None


METHODS = {
    m.name: m
    for m in (
        Method("bf16", None, "bf16", None),
        Method("bnb-nf4", _NF4, "bnb-nf4", "bitsandbytes"),
        Method("bnb-int8", {"quant_method": "bitsandbytes", "load_in_8bit": True}, "bnb-int8", "bitsandbytes"),
        Method("hqq-4bit", {"quant_method": "hqq", "nbits": 4, "group_size": 64, "axis": 1}, "bf16", "hqq"),
        Method("eetq-int8", {"quant_method": "eetq", "weights": "int8"}, "bf16", "eetq"),
        Method("prequant-nf4", None, "prequant-nf4", "bitsandbytes", pre_quantized=True),
    )
}

#: The transformers side, by name. ``prequant-nf4`` reads the quantization config stored in config.json.
REFERENCES = {
    "bf16": {"quantization": None, "library": None},
    "bnb-nf4": {
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
        "library": "bitsandbytes",
    },  # fmt: skip
    "bnb-int8": {"quantization": {"load_in_8bit": True}, "library": "bitsandbytes"},
    "prequant-nf4": {"quantization": None, "library": "bitsandbytes"},
}

#: The method whose qcore-saved checkpoint ``prequant-nf4`` loads.
PREQUANTIZED_FROM = "bnb-nf4"
