"""Dequantizing and converting: the inverse of ``load_weight``, for a model back in full precision or in another method.

This runs after the six phases, on a loaded model. :func:`dequantize` swaps every quantized module for the plain
``nn.Linear`` (or ``Conv1D``) the model class builds there, filled from its backend's ``dequantize_module`` hook.
:class:`DequantizedSource` is a :class:`~qcore.checkpoint.CheckpointSource` over a loaded quantized model whose
tensors are the full-precision ones, made one module at a time as they are streamed: handed to
:func:`qcore.from_pretrained` with another method's config, it converts between methods (``qcore convert``,
:func:`convert`) without ever holding the full-precision model. Each quantized module is dropped from the source
model once its tensors have been handed out, so a conversion's peak memory stays near the larger of the two
quantized models plus one module in full precision.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qcore import plugins
from qcore.checkpoint import CheckpointSource, TensorInfo
from qcore.config import QuantConfig
from qcore.errors import CheckpointError, ConfigError, PluginError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from qcore.recipe import Recipe

__all__ = ["dequantize", "dequantize_module", "DequantizedSource", "convert"]

_SAFETENSORS_CODES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def dequantize_module(model: nn.Module, module_name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full-precision tensors of quantized module ``module_name``, from its backend's ``dequantize_module``.

    :raises ConfigError: the module is not quantized, or its backend cannot dequantize (implements no hook).
    :raises PluginError: the hook raised, or returned something other than a dict of tensors with a ``weight``.
    """
    from qcore.loading import _run

    config = _applied(model).get(module_name)
    if config is None:
        raise ConfigError(f"module {module_name!r} is not quantized by qcore; there is nothing to dequantize")
    registered = plugins.backend_for(config.quant_method)
    module = model.get_submodule(module_name)
    result = _run(
        "dequantize_module", registered, module_name, config=config, module_name=module_name, module=module, dtype=dtype
    )
    if result is None:
        raise ConfigError(
            f"backend {registered.distribution} cannot turn {module_name!r} back into full precision: it implements "
            f"no dequantize_module hook; upgrade it, or ask its authors for one"
        )
    if not (
        isinstance(result, Mapping)
        and isinstance(result.get("weight"), torch.Tensor)
        and all(isinstance(v, torch.Tensor) for v in result.values())
    ):
        wrong = TypeError(f"returned {type(result).__name__}, not a dict of tensors holding at least 'weight'")
        raise PluginError(registered.distribution, "dequantize_module", module_name, wrong)
    return dict(result)


def dequantize(model: Any, dtype: torch.dtype | str | None = None) -> Any:
    """Turn every quantized module of ``model`` back into the plain module its class builds, in place.

    The model then holds no quantized module and no quantization marks (``hf_quantizer``, ``is_quantized``,
    ``config.quantization_config``): transformers sees a full-precision model, and :func:`qcore.save_pretrained`
    writes a full-precision checkpoint.

    :param dtype: the dtype of the weights; by default the one the model was loaded with.
    :returns: ``model``.
    :raises ConfigError: a backend of the model implements no ``dequantize_module``.
    """
    from qcore.loading import _resolve_dtype

    dtype = _resolve_dtype(dtype, model.config)
    plain = _plain_skeleton(model, dtype)
    applied = _applied(model)
    # A tied pair a backend held quantized once (an embedding and its output layer) comes back tied: the source is
    # dequantized, the target becomes the plain module again and shares the source's weight.
    tied = {
        target.rpartition(".")[0]
        for target, source in (getattr(plain, "all_tied_weights_keys", None) or {}).items()
        if target.rpartition(".")[0] in applied and source.rpartition(".")[0] in applied
    }
    for name in list(applied):
        if name in tied:
            model.set_submodule(name, copy.deepcopy(plain.get_submodule(name)))
            continue
        tensors = dequantize_module(model, name, dtype)
        model.set_submodule(name, _filled(plain.get_submodule(name), tensors, name, model))
    if tied:
        model.tie_weights()
    _unmark(model)
    return model


class DequantizedSource(CheckpointSource):
    """A loaded (quantized) model as a checkpoint of full-precision tensors, in the plain transformers naming.

    Every tensor a plain load of the model class expects is listed (from a meta skeleton, no data); a quantized
    module's tensors are made by its backend's ``dequantize_module`` when it is first read, kept only until its last
    tensor has been handed out, and the module is then dropped from ``model`` (its memory goes back). Other tensors
    are the model's own, shared, not copied. The model is therefore emptied as it is streamed: use it once.
    """

    def __init__(self, model: Any, directory: str | os.PathLike[str], dtype: torch.dtype | str | None = None):
        """:param directory: where the model came from (its tokenizer and generation config are found there)."""
        from qcore.loading import _resolve_dtype

        self.model = model
        self.dtype = _resolve_dtype(dtype, model.config)
        self.directory = Path(directory)
        self.files = [self.directory]
        self.metadata: dict[str, str] = {}
        self._applied = dict(_applied(model))
        plain = _plain_skeleton(model, self.dtype)
        tied = set(getattr(plain, "all_tied_weights_keys", None) or {})
        self._module_of: dict[str, tuple[str, str]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, value in plain.state_dict().items():
            if name in tied:
                continue
            module_name, _, tensor_name = name.rpartition(".")
            if module_name not in self._applied:
                value = _tensor_of(model, name)
            self.tensors[name] = TensorInfo(name, self.directory, _SAFETENSORS_CODES[value.dtype], tuple(value.shape))
            self._module_of[name] = (module_name, tensor_name)
        self._remaining: dict[str, set[str]] = {}
        for name, (module_name, _) in self._module_of.items():
            if module_name in self._applied:
                self._remaining.setdefault(module_name, set()).add(name)
        self._current: tuple[str, dict[str, torch.Tensor]] | None = None
        self._config = _plain_config(model)

    def model_config(self) -> PretrainedConfig:
        return self._config

    def read(self, name: str) -> torch.Tensor:
        module_name, tensor_name = self._module_of[name]
        if module_name not in self._applied:
            return _tensor_of(self.model, name).detach()
        if self._current is None or self._current[0] != module_name:
            if module_name not in self._remaining:
                raise CheckpointError(
                    "was already read once; a DequantizedSource hands each quantized module out once, then drops it",
                    tensor=name,
                )
            self._current = (module_name, dequantize_module(self.model, module_name, self.dtype))
        tensors = self._current[1]
        if tensor_name not in tensors:
            raise CheckpointError(
                f"the backend's dequantize_module gave {sorted(tensors)} for {module_name!r}, without {tensor_name!r}",
                tensor=name,
            )
        tensor = (
            tensors[tensor_name].to(self.dtype) if tensors[tensor_name].is_floating_point() else tensors[tensor_name]
        )
        expected = self.tensors[name].shape
        if tuple(tensor.shape) != expected:
            wrong = ValueError(f"dequantize_module gave {tensor_name} shape {tuple(tensor.shape)}, expected {expected}")
            raise PluginError(plugins.backend_for(self._applied[module_name].quant_method).distribution,
                              "dequantize_module", module_name, wrong)  # fmt: skip
        remaining = self._remaining[module_name]
        remaining.discard(name)
        if not remaining:
            # Every tensor of the module is out: drop it (the quantized form) and its full-precision tensors.
            del self._remaining[module_name]
            self._current = None
            self.model.set_submodule(module_name, nn.Module())
        return tensor

    def stream(self, names: Collection[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        # Model order keeps a module's tensors together, so each module is dequantized once and held briefly.
        for name in self.tensors:
            if names is None or name in names:
                yield name, self.read(name)


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    quantization_config: QuantConfig | Recipe | Mapping[str, Any] | None,
    *,
    dtype: torch.dtype | str | None = None,
    gguf_file: str | None = None,
    calibration: Any = None,
    overwrite: bool = False,
    progress: Any = None,
) -> Any:
    """Convert the checkpoint ``src`` (quantized by any installed method) into ``quantization_config`` at ``out``.

    ``src`` is loaded as stored (quantized), then streamed through :class:`DequantizedSource` into a load with the
    target config, which is saved; ``None`` as the target writes full precision. Tokenizer files are copied.

    :returns: the converted model.
    """
    from qcore.cli.quantize import copy_tokenizer
    from qcore.loading import from_pretrained
    from qcore.saving import save_pretrained

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(
            "destination exists and is not empty; pass overwrite=True (--overwrite) or choose another directory",
            file=str(out),
        )
    source_model = from_pretrained(src, dtype=dtype, gguf_file=gguf_file)
    path = Path(src)
    directory = path if path.is_dir() else path.parent if path.is_file() else Path(source_model.name_or_path)
    source = DequantizedSource(source_model, directory, dtype)
    del source_model  # the source holds it, and empties it as it streams
    model = from_pretrained(source, quantization_config, dtype=source.dtype, calibration=calibration, progress=progress)
    save_pretrained(model, out, overwrite=overwrite)
    copy_tokenizer(directory, out)
    return model


# -- helpers ---------------------------------------------------------------------------------------------------


def _applied(model: Any) -> dict[str, QuantConfig]:
    return dict(getattr(model, "qcore_applied", None) or {})


def _plain_config(model: Any) -> Any:
    config = copy.deepcopy(model.config)
    for name in ("quantization_config", "_is_quantized"):
        if name in config.__dict__:
            delattr(config, name)
    return config


def _plain_skeleton(model: Any, dtype: torch.dtype) -> nn.Module:
    """The model class built on the meta device from the plain config: the modules a plain load would hold."""
    from qcore.loading import _build_skeleton

    return _build_skeleton(type(model), _plain_config(model), dtype, {})


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, tensor_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = module._parameters.get(tensor_name)
    if value is None:
        value = module._buffers.get(tensor_name)
    if value is None:
        raise CheckpointError("the loaded model holds no such tensor; it does not match its own config", tensor=name)
    return value


def _filled(skeleton_module: nn.Module, tensors: dict[str, torch.Tensor], name: str, model: Any) -> nn.Module:
    """A copy of the plain skeleton's module holding ``tensors`` (checked against its shapes)."""
    module = copy.deepcopy(skeleton_module)
    expected = {key: tuple(p.shape) for key, p in module.named_parameters()}
    if set(tensors) != set(expected) or any(tuple(tensors[k].shape) != expected[k] for k in tensors):
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        wrong = ValueError(f"returned {got}, but the plain module holds {expected}")
        config = _applied(model)[name]
        raise PluginError(plugins.backend_for(config.quant_method).distribution, "dequantize_module", name, wrong)
    for key, value in tensors.items():
        module._parameters[key] = nn.Parameter(value, requires_grad=value.is_floating_point())
    return module


def _unmark(model: Any) -> None:
    """Remove what :func:`qcore.from_pretrained` recorded about quantization, where transformers looks for it."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name in ("quantization_config", "_is_quantized"):
                if name in config.__dict__:
                    delattr(config, name)
    for name in ("hf_quantizer", "quantization_method"):
        if name in model.__dict__:
            delattr(model, name)
    model.is_quantized = False
    model.qcore_applied = {}
    model.qcore_kernels = {}
