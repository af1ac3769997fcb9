"""What each torchao config needs of the device: the refusal ``validate`` (phase 1) raises before any weight is read,
and the line ``qcore backends`` shows. Imports neither torch nor torchao (``validate`` passes in what it found).

    Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
    Float8WeightOnlyConfig, IntxWeightOnlyConfig        any device (torchao's own CPU and CUDA paths)
    Int4WeightOnlyConfig                                CUDA; int4_packing_format "plain", "plain_int32" and
                                                        "preshuffled" also need the mslk package, "tile_packed_to_4d"
                                                        runs torch's tinygemm kernel
    Float8DynamicActivationFloat8WeightConfig           CUDA compute capability 8.9 or newer (torch._scaled_mm)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

__all__ = ["device_need", "kernel_notes"]

_CPU_ALTERNATIVES = "Int8WeightOnlyConfig, or IntxWeightOnlyConfig with weight_dtype int4 and PerGroup(32)"


def device_need(config: Mapping[str, Any], device: str, capability: tuple[int, int] | None) -> str | None:
    """Why torchao cannot apply ``config`` (a checked torchao config dict) on ``device``; ``None`` when it can.

    :param capability: the CUDA compute capability of ``device``, ``None`` for a CPU.
    """
    name, data = config["_type"], config["_data"]
    if name == "Int4WeightOnlyConfig":
        if device != "cuda":
            return (
                f"Int4WeightOnlyConfig needs CUDA (torchao 0.18 has no {device} kernel for its int4 packing "
                f"formats); load onto a CUDA device, or choose {_CPU_ALTERNATIVES} on the CPU"
            )
        packing = data.get("int4_packing_format", {"_data": "PLAIN"})["_data"]
        if packing != "TILE_PACKED_TO_4D" and importlib.util.find_spec("mslk") is None:
            return (
                f"Int4WeightOnlyConfig with int4_packing_format {packing.lower()!r} needs CUDA and the mslk package "
                f"(pip install mslk); or use int4_packing_format 'tile_packed_to_4d' (torch's tinygemm kernel)"
            )
    if name == "Float8DynamicActivationFloat8WeightConfig" and (capability is None or capability < (8, 9)):
        where = "a CPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
        return (
            f"Float8DynamicActivationFloat8WeightConfig needs a CUDA GPU with FP8 (compute capability 8.9 or newer: "
            f"L4, H100); this is {where}. Use Float8WeightOnlyConfig here"
        )
    return None


def kernel_notes() -> str:
    """One line for ``qcore backends``."""
    return (
        "torchao's tensor subclasses under F.linear: int8 / float8 / intx weight-only and int8 dynamic on any "
        "device; Int4WeightOnlyConfig and float8 dynamic on CUDA only; opt-in torch.compile ('compile': true)"
    )
