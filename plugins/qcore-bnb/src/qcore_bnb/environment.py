"""What bitsandbytes can run here: the library and device checks of phases 1-2, the kernel report of phase 6.

bitsandbytes picks its kernel per call (by device, batch size and dtype) inside ``matmul_4bit``/``matmul``; there is
nothing to switch on after loading, so ``optimize_runtime`` only names the path that will run.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import qcore

from qcore_bnb.config import BnbConfig

__all__ = ["MIN_VERSION", "import_bitsandbytes", "check_devices", "check_offload", "offloaded_prefixes", "kernel_name"]

#: transformers' own minimum (``BITSANDBYTES_MIN_VERSION``): the CPU backend and the packed quant-state format.
MIN_VERSION = "0.50.0"
REQUIREMENT = f"bitsandbytes>={MIN_VERSION}"


def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes, or raise :class:`qcore.BackendUnavailable` with the pip command that fixes it."""
    from packaging.version import Version

    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise qcore.BackendUnavailable(
            f"bitsandbytes cannot be imported ({error}); install it: pip install '{REQUIREMENT}'"
        ) from None
    version = getattr(bnb, "__version__", "0")
    if Version(version) < Version(MIN_VERSION):
        raise qcore.BackendUnavailable(
            f"bitsandbytes {version} is too old (qcore-bnb needs {MIN_VERSION}+): pip install -U '{REQUIREMENT}'"
        )
    return bnb


def check_devices(bnb: ModuleType, device_map: Mapping[str, Any]) -> None:
    """Raise :class:`qcore.BackendUnavailable` for a device in ``device_map`` bitsandbytes cannot compute on."""
    import torch

    supported = set(getattr(bnb, "supported_torch_devices", {"cpu", "cuda"}))
    for prefix, target in device_map.items():
        if target == "disk":
            continue
        where = f"device_map[{prefix!r}] = {target!r}"
        try:
            device = torch.device(f"cuda:{target}" if isinstance(target, int) else target)
        except (RuntimeError, TypeError):
            raise qcore.ConfigError(f"{where} is not a device; use 'cpu', 'cuda:N' or a GPU index") from None
        if device.type not in supported:
            raise qcore.BackendUnavailable(
                f"{where}: bitsandbytes {bnb.__version__} has no kernels for {device.type!r} (it supports "
                f"{', '.join(sorted(supported))}); place the model on one of those, or choose another backend"
            )
        accelerator = getattr(torch, device.type, None)
        if device.type != "cpu" and not (accelerator is not None and accelerator.is_available()):
            raise qcore.BackendUnavailable(f"{where}: torch has no {device.type} device here; use device_map='cpu'")
        if device.type == "cuda":
            library = bnb.cextension.lib
            if not getattr(library, "compiled_with_cuda", False):
                raise qcore.BackendUnavailable(
                    f"{where}: bitsandbytes could not load its CUDA library "
                    f"({getattr(library, 'error_msg', 'CPU-only build')}); reinstall a CUDA build: "
                    f"pip install --force-reinstall '{REQUIREMENT}'"
                )


def check_offload(config: BnbConfig, device_map: Mapping[str, Any]) -> None:
    """No quantized layer on disk; and transformers' rule: modules on the CPU beside an accelerator need
    llm_int8_enable_fp32_cpu_offload."""
    on_disk = sorted(prefix for prefix, target in device_map.items() if target == "disk")
    if on_disk:
        raise qcore.ConfigError(
            f"bitsandbytes: modules {on_disk} are mapped to 'disk', where quantized layers cannot live; give them CPU "
            f"or GPU memory (max_memory), or choose a smaller preset"
        )
    values = {str(target) for target in device_map.values()}
    if config.llm_int8_enable_fp32_cpu_offload or values == {"cpu"} or "cpu" not in values:
        return
    offloaded = sorted(prefix for prefix, target in device_map.items() if target in ("cpu", "disk"))
    raise qcore.ConfigError(
        f"bitsandbytes: modules {offloaded} are placed on the CPU or disk next to an accelerator, which the "
        f"quantized layers cannot run from; give them accelerator memory, or set "
        f"llm_int8_enable_fp32_cpu_offload=True to keep exactly those modules unquantized"
    )


def offloaded_prefixes(config: BnbConfig, device_map: Mapping[str, Any]) -> list[str]:
    """Device-map keys whose modules stay unquantized, as transformers adds them to ``modules_to_not_convert``."""
    if not config.llm_int8_enable_fp32_cpu_offload:
        return []
    return [prefix for prefix, target in device_map.items() if target in ("disk", "cpu")]


def kernel_name(config: BnbConfig, device_types: set[str]) -> str:
    """The bitsandbytes matmul path the quantized layers take on ``device_types``, in a few words."""
    from bitsandbytes.functional import has_avx512bf16

    if not device_types:
        return "none: every module stayed in full precision (llm_int8_enable_fp32_cpu_offload)"
    paths = []
    for device_type in sorted(device_types):
        if config.load_in_8bit:
            matmul = {"cpu": "torch._int_mm", "cuda": "cuBLASLt int8"}.get(device_type, "int8 matmul")
            paths.append(
                f"{device_type}: LLM.int8() {matmul}, activations above {float(config.llm_int8_threshold)} in fp16"
            )
        elif device_type == "cuda":
            paths.append("cuda: gemm_4bit, fused gemv_4bit for batch-1 decoding")
        elif device_type == "cpu" and has_avx512bf16():
            paths.append("cpu: AVX512-BF16 4-bit gemm on weights repacked at the first inference call")
        else:
            paths.append(f"{device_type}: dequantize_4bit + torch matmul")
    return f"bitsandbytes {config.short_name().removeprefix('bitsandbytes ')} ({'; '.join(paths)})"
