"""The :class:`LoadContext` every phase hook receives: what is being loaded, where, and with which modules.

The loader makes one context per (backend, config) it runs, sharing the load-wide state, so each backend's
``context.modules`` lists only the modules it owns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcore.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from qcore.checkpoint import CheckpointSource, TensorInfo

__all__ = ["LoadContext"]


@dataclasses.dataclass
class LoadContext:
    """What one backend sees of a load."""

    #: The local checkpoint directory (a hub id is resolved to its snapshot directory first).
    source: Path
    #: The model's transformers config (config.json).
    model_config: PretrainedConfig
    #: True when the checkpoint already holds quantized tensors (config.json carries ``quantization_config``).
    pre_quantized: bool
    #: The dtype of the model's floating-point weights that stay in full precision.
    dtype: torch.dtype
    #: accelerate-style device map: module-name prefix -> device; ``""`` is the whole model.
    device_map: dict[str, Any]
    #: The checkpoint's tensors (names, stored types, shapes) and its ``metadata``, read from headers only.
    checkpoint: CheckpointSource
    #: The modules this backend owns (names in the model), in model order.
    modules: tuple[str, ...] = ()
    #: Kernels chosen in ``optimize_runtime``: backend name -> kernel name; shared by every backend of the load.
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Modules a config's settings did not fit, and what the backend did instead (``report_fallback``); shared by
    #: every backend of the load and shown as ``model.qcore_fallbacks``.
    fallbacks: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The backend this context was made for.
    backend_name: str = ""
    #: Modules this backend took with :meth:`take` (also in ``modules``).
    taken: tuple[str, ...] = ()
    #: True when this backend's modules are quantized by ``calibrate_block`` (its config needs calibration and the
    #: checkpoint is full precision): ``preprocess_model`` must then leave them as they are.
    calibrating: bool = False
    #: Decoder block name -> the names of this backend's modules inside it, for a calibrating load.
    _blocks: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict, repr=False)
    #: Checkpoint key -> model key renames applied (prefix added or removed), shared by the load.
    _pending: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False)
    _module_keys: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict, repr=False)

    def for_backend(self, backend_name: str, modules: tuple[str, ...], module_keys: Mapping[str, frozenset[str]]):
        """A context for one backend, sharing this load's state."""
        return dataclasses.replace(
            self, backend_name=backend_name, modules=modules, taken=(), _pending={}, _module_keys=module_keys
        )

    def take(self, module_name: str) -> None:
        """Own ``module_name`` too, though the core did not assign it (call it in ``preprocess_model``).

        For a module the core keeps in full precision that this backend holds quantized instead, such as a tied
        input embedding kept in the checkpoint's quantized form: its checkpoint tensors (named as the checkpoint
        names them) reach ``load_weight``, ``qcore.dequantize`` asks ``dequantize_module`` for it, and the core
        leaves its tying to the backend. Two backends taking one module is a ``PluginError``.
        """
        if module_name in self.modules:
            return
        prefix = module_name + "."
        names = frozenset(key[len(prefix) :] for key in self.checkpoint.tensors if key.startswith(prefix))
        self.modules = (*self.modules, module_name)
        self._module_keys = {**self._module_keys, module_name: names}
        self.taken = (*self.taken, module_name)

    def device_for(self, module_name: str) -> torch.device:
        """The device a module's tensors must end on, from the (final) device map."""
        import torch

        best, device = -1, "cpu"
        for prefix, target in self.device_map.items():
            if prefix == "" or module_name == prefix or module_name.startswith(prefix + "."):
                if len(prefix) > best:
                    best, device = len(prefix), target
        if device == "disk":
            device = "cpu"
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")

    def block_modules(self, block_name: str) -> tuple[str, ...]:
        """The modules this backend owns inside decoder block ``block_name`` (names in the model), in model order."""
        return self._blocks.get(block_name, ())

    def tensor_names(self, module_name: str) -> frozenset[str]:
        """Names (relative to the module) of every checkpoint tensor that belongs to ``module_name``."""
        return self._module_keys.get(module_name, frozenset())

    def stored_info(self, module_name: str, tensor_name: str, base_model_prefix: str = "") -> TensorInfo:
        """The header entry (shape, stored dtype) of one of a module's checkpoint tensors, read before any data.

        Checkpoints name tensors with or without the model's base-model prefix (``model.``), as transformers
        accepts both; pass ``model.base_model_prefix`` to find either.

        :raises CheckpointError: the checkpoint has no such tensor.
        """
        key = f"{module_name}.{tensor_name}"
        prefix = base_model_prefix + "." if base_model_prefix else ""
        for candidate in (key, key.removeprefix(prefix) if prefix else key, prefix + key):
            info = self.checkpoint.tensors.get(candidate)
            if info is not None:
                return info
        raise CheckpointError(f"no header entry for {key}", file=str(self.source), tensor=key)

    def gather(
        self, module_name: str, tensor_name: str, tensor: Any, *, exclude: tuple[str, ...] = ("bias",)
    ) -> dict[str, Any] | None:
        """Collect a module's checkpoint tensors; return them all (name -> tensor) once the last one arrives.

        For backends whose stored form spans several tensors (a weight and its statistics): call it from
        ``load_weight`` with each tensor, return ``{}`` while it returns ``None``, and build the module's weight from
        the dict it finally returns. Tensors named in ``exclude`` are not waited for (by default the bias, which a
        backend usually lets the core place).
        """
        pending = self._pending.setdefault(module_name, {})
        pending[tensor_name] = tensor
        expected = self.tensor_names(module_name) - set(exclude)
        if expected and not expected <= pending.keys():
            return None
        return self._pending.pop(module_name)

    def check_gathered(self) -> None:
        """Raise :class:`CheckpointError` for any module whose tensors never all arrived."""
        for module_name, pending in self._pending.items():
            missing = sorted(self.tensor_names(module_name) - pending.keys())
            raise CheckpointError(
                f"module {module_name!r} is missing {missing} (has {sorted(pending)}); the checkpoint is incomplete",
                file=str(self.source),
                tensor=f"{module_name}.{missing[0]}" if missing else module_name,
            )

    def report_fallback(self, module_name: str, what: str) -> None:
        """Record that ``module_name`` does not fit the config's settings and what was done instead (the words of
        :meth:`QuantConfig.shape_fallback`); the load summary and ``model.qcore_fallbacks`` show it."""
        self.fallbacks[module_name] = what

    def report_kernel(self, kernel: str) -> None:
        """Record the kernel this backend chose in ``optimize_runtime`` (shown as ``model.qcore_kernels``)."""
        self.kernels[self.backend_name] = kernel
