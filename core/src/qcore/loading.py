"""``qcore.from_pretrained``: the streaming quantized loader, running the six phases top to bottom.

    config.json -> configs -> 1 validate -> weights located, headers checked -> skeleton on meta
    -> modules assigned to backends -> 2 update_device_map -> memory guard -> 3 preprocess_model
    -> 4 load_weight, tensor by tensor, shard by shard -> tie weights -> 5 postprocess -> missing check
    -> 6 optimize_runtime -> model

Peak memory stays near the quantized model plus the tensor in hand: the skeleton holds no weights, each tensor is
read from a memory map, converted and placed on its device, and dropped before the next is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore import plugins
from qcore.checkpoint import CheckpointReader
from qcore.config import QuantConfig
from qcore.context import LoadContext
from qcore.errors import CheckpointError, ConfigError, InsufficientMemory, PluginError, QcoreError
from qcore.recipe import RECIPE_METHOD, Recipe

__all__ = ["from_pretrained", "plan", "LoadPlan", "estimate_nbytes"]

logger = logging.getLogger("qcore")

#: Buffers that old checkpoints carry but current transformers models compute themselves.
_IGNORED_UNEXPECTED = ("rotary_emb.inv_freq", "position_ids", "attn.bias", "attn.masked_bias")
#: Held for a whole load and while any skeleton is built. Building a transformers model patches process-wide state
#: for its duration (accelerate's register_parameter, transformers' tie_weights and default dtype), so a load in
#: another thread would see it: its weights tied to nothing or registered on the meta device, or each build
#: restoring the other's patch for good. Loads in threads therefore run one at a time.
_LOAD_LOCK = threading.RLock()


def _one_load_at_a_time(function):
    @functools.wraps(function)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOAD_LOCK:
            return function(*args, **kwargs)

    return locked


@dataclasses.dataclass
class _Unit:
    """One (backend, config) pair of a load and the modules it owns."""

    registered: Any
    config: QuantConfig
    context: LoadContext

    @property
    def name(self) -> str:
        return self.registered.distribution


@_one_load_at_a_time
def from_pretrained(
    src: str | os.PathLike[str],
    quantization_config: QuantConfig | Recipe | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | int | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, int | str] | None = None,
    model_class: type | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    allow_unexpected: bool = False,
    check_memory: bool = True,
    progress: Any = None,
    **model_kwargs: Any,
):
    """Load a transformers model from ``src``, quantizing its weights while loading.

    Safe to call from several threads; the loads run one at a time (building a transformers model patches
    process-wide state). Load in separate processes to load in parallel.

    :param src: a local checkpoint directory or a hub id (``"org/name"``, resolved through huggingface_hub: config.json
        first, then only the weight files needed).
    :param quantization_config: a :class:`~qcore.QuantConfig`, a :class:`~qcore.Recipe`, or the dict transformers writes
        as ``quantization_config`` (``{"quant_method": ...}``; ``{"rules": [...]}`` for a recipe). ``None`` loads a
        plain checkpoint unquantized and a pre-quantized checkpoint as it was saved. Given with a pre-quantized
        checkpoint, only its loading attributes (e.g. a compute dtype) apply.
    :param dtype: dtype of the weights kept in full precision; defaults to the checkpoint's.
    :param device_map: ``"cpu"``, ``"cuda:0"``, ``"auto"``, ``"balanced"``, ``"sequential"`` or an accelerate-style dict.
    :param max_memory: per-device limits for ``"auto"``/``"balanced"`` maps, as accelerate takes them.
    :param model_class: the transformers class to build; by default the one config.json's ``architectures`` names.
    :param allow_pickle: load ``.bin``/``.pt`` weights (with ``torch.load(weights_only=True)``) instead of refusing.
    :param allow_unexpected: only warn about checkpoint tensors the model has no place for.
    :param check_memory: refuse up front, with both numbers, a load that cannot fit in the target devices' memory.
    :param progress: a callable ``(done, total, name)`` called after each tensor (the CLI draws a bar with it).
    :param model_kwargs: passed to the model's constructor (e.g. ``attn_implementation``).
    :returns: a ``transformers.PreTrainedModel`` in eval mode.
    """
    source = _resolve_source(src, revision)
    model_config = _read_model_config(source, model_kwargs)
    spec, pre_quantized = _resolve_spec(model_config, quantization_config)
    dtype = _resolve_dtype(dtype, model_config)

    # Phase 1: validate every (backend, config) before a single weight is read or downloaded.
    requested_map = (
        dict(device_map) if isinstance(device_map, Mapping) else {"": device_map} if device_map is not None else {}
    )
    context = LoadContext(source, model_config, pre_quantized, dtype, requested_map, None)  # type: ignore[arg-type]
    configs = spec.configs() if spec is not None else []
    for config in configs:
        registered = plugins.ensure_available(config.quant_method)
        _run("validate", registered, None, config=config, context=context.for_backend(registered.distribution, (), {}))

    source = _fetch_weights(src, source, revision)
    reader = CheckpointReader(source, allow_pickle=allow_pickle)
    reader.load_pickle_infos()
    context.source, context.checkpoint = source, reader

    model = _build_skeleton(model_class, model_config, dtype, model_kwargs)
    keys = _KeyMapper(model, reader.tensors)
    candidates = _candidates(model)
    applied, units = _assign(spec, model, candidates, keys, context)
    no_place = _check_fit(model, keys, reader, {name for unit in units for name in unit.context.modules}, pre_quantized)
    _report_unexpected(sorted(no_place), allow_unexpected, reader)

    # Phase 2: device placement.
    device_map = _initial_device_map(device_map, model, dtype, max_memory)
    for unit in units:
        unit.context.device_map = device_map
        new_map = _run(
            "update_device_map",
            unit.registered,
            None,
            config=unit.config,
            context=unit.context,
            device_map=dict(device_map),
        )
        new_map = _first(new_map)
        if new_map is not None and not isinstance(new_map, Mapping):
            wrong = TypeError(f"returned {type(new_map).__name__}, not a dict or None")
            raise PluginError(unit.name, "update_device_map", None, wrong)
        device_map = new_map or device_map
    _check_device_map(device_map)
    for unit in units:
        unit.context.device_map = device_map
    context.device_map = device_map
    if check_memory:
        _check_memory(model, applied, device_map, dtype, context)

    # Phase 3: prepare the skeleton.
    for unit in units:
        _run("preprocess_model", unit.registered, None, config=unit.config, context=unit.context, model=model)

    # Phase 4: stream every tensor through its owner.
    keys.modules = dict(model.named_modules())  # preprocess_model replaced some
    owner_of = {name: unit for unit in units for name in unit.context.modules}
    unexpected = _stream(model, reader, keys, owner_of, context, progress, skip=no_place)
    _report_unexpected(unexpected, allow_unexpected, reader)
    model.tie_weights()

    # Phase 5: finish.
    for unit in units:
        unit.context.check_gathered()
        _run("postprocess", unit.registered, None, config=unit.config, context=unit.context, model=model)
    _check_missing(model, reader)

    _mark_quantized(model, spec, applied, candidates, context)
    # Phase 6: kernels.
    for unit in units:
        _run("optimize_runtime", unit.registered, None, config=unit.config, context=unit.context, model=model)

    if len({str(d) for d in device_map.values()}) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map)
    _load_generation_config(model, source)
    model.eval()
    return model


# -- planning a load without loading -------------------------------------------------------------------------


def plan(
    src: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    model_class: type | None = None,
    **model_kwargs: Any,
) -> LoadPlan:
    """What :func:`from_pretrained` would build from ``src``, worked out from config.json alone.

    No weight file is read, and for a hub id only config.json is downloaded. The arguments mean what they mean for
    :func:`from_pretrained`; one plan answers for any number of quantization configs (``qcore estimate`` and
    ``qcore recommend`` compare presets with it).
    """
    source = _resolve_source(src, revision)
    model_config = _read_model_config(source, model_kwargs)
    dtype = _resolve_dtype(dtype, model_config)
    return LoadPlan(_build_skeleton(model_class, model_config, dtype, model_kwargs), dtype)


@dataclasses.dataclass
class LoadPlan:
    """The skeleton :func:`from_pretrained` would fill, and what each quantization config would make of it."""

    #: The model exactly as the loader builds it before reading weights: parameters on the meta device.
    model: nn.Module
    #: The dtype of the weights kept in full precision.
    dtype: torch.dtype

    @property
    def pre_quantized(self) -> bool:
        return getattr(self.model.config, "quantization_config", None) is not None

    def assign(
        self, quantization_config: QuantConfig | Recipe | Mapping[str, Any] | None = None
    ) -> dict[str, QuantConfig]:
        """Module name -> config, as the loader would assign them (for a pre-quantized checkpoint, the stored ones)."""
        spec, _ = _resolve_spec(self.model.config, quantization_config)
        return _assignment(spec, self.model, _candidates(self.model)) if spec is not None else {}

    def parameter_count(self) -> int:
        """Parameters of the model in full precision, tied weights counted once."""
        tied = self._tied_targets()
        return sum(p.numel() for name, p in self.model.named_parameters() if name not in tied)

    def nbytes(self, quantization_config: QuantConfig | Recipe | Mapping[str, Any] | None = None) -> int:
        """Bytes the loaded model will hold: parameters, buffers and each backend's quantization statistics.

        ``model.get_memory_footprint()`` reports the same, less the statistics some backends keep outside parameters
        and buffers (bitsandbytes' ``quant_state``, HQQ's ``meta``).
        """
        total = sum(estimate_nbytes(self.model, self.assign(quantization_config), self.dtype).values())
        # The loader ties weights once every tensor is in, so a tied target shares its source's storage.
        element = torch.tensor([], dtype=self.dtype).element_size()
        total -= sum(self.model.get_parameter(name).numel() * element for name in self._tied_targets())
        # Buffers computed at construction (RoPE frequencies) are already real in the skeleton, in their own dtype.
        return total + sum(b.numel() * b.element_size() for b in self.model.buffers() if b.device.type != "meta")

    def _tied_targets(self) -> set[str]:
        return set(getattr(self.model, "all_tied_weights_keys", None) or {})


# -- source and configs --------------------------------------------------------------------------------------


def _resolve_source(src: str | os.PathLike[str], revision: str | None) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if isinstance(src, str) and src.count("/") == 1 and not path.exists():
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return Path(hf_hub_download(src, "config.json", revision=revision)).parent
        except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as error:
            raise CheckpointError(
                f"cannot fetch config.json of hub id {src!r} ({type(error).__name__}: {error}); check the id, your "
                f"network, or HF_HUB_OFFLINE with a populated cache",
                file=str(src),
            ) from None
    raise CheckpointError("no such directory (and not a hub id of the form org/name)", file=str(src))


def _fetch_weights(src: Any, source: Path, revision: str | None) -> Path:
    """For a hub id, download the weight files (and tokenizer, generation config) once validation passed."""
    if Path(src).is_dir():
        return source
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return Path(snapshot_download(str(src), revision=revision, allow_patterns=patterns))


def _read_model_config(source: Path, model_kwargs: dict[str, Any]):
    from transformers import AutoConfig

    path = source / "config.json"
    if not path.is_file():
        raise CheckpointError("no config.json; a transformers checkpoint needs one", file=str(source))
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deeply for the parser
        reason = f"{type(error).__name__}: {error}"
        raise ConfigError(f"{path}: invalid JSON ({reason}); fix or regenerate config.json") from None
    if not isinstance(parsed, dict):
        kind = type(parsed).__name__
        raise ConfigError(f"{path}: must hold a JSON object, not {kind}; fix or regenerate config.json")
    if parsed.get("quantization_config") is not None and not isinstance(parsed["quantization_config"], dict):
        raise ConfigError(
            f"config.json: quantization_config must be an object with a 'quant_method', not "
            f"{parsed['quantization_config']!r}; fix it in {path}"
        )
    # False is the only value qcore supports, so it is accepted and dropped rather than passed to the model class.
    if model_kwargs.pop("trust_remote_code", False):
        raise ConfigError("qcore never runs a checkpoint's own code: trust_remote_code is not supported")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as error:  # transformers and huggingface_hub validate with exception types sharing no base
        raise ConfigError(
            f"{path}: not a usable transformers config ({type(error).__name__}: {error}); fix the field it names or "
            f"regenerate config.json"
        ) from None


def _resolve_spec(model_config, user: Any) -> tuple[Recipe | None, bool]:
    """The recipe to apply and whether the checkpoint is pre-quantized (the merge rule of the reference workflow)."""
    stored = getattr(model_config, "quantization_config", None)
    if stored is not None and not isinstance(stored, Mapping):
        stored = stored.to_dict()
    user_spec = _as_recipe(user) if user is not None else None
    if stored is None:
        return user_spec, False
    try:
        stored_spec = _as_recipe(dict(stored))
    except ConfigError as error:
        raise ConfigError(f"config.json quantization_config: {error}") from None
    if user_spec is None:
        return stored_spec, True
    if user_spec.rules or len(stored_spec.configs()) != 1 or user_spec.default is None:
        raise ConfigError(
            "the checkpoint is already quantized; pass no quantization_config, or a single config whose loading "
            "attributes (e.g. compute dtype) should override the stored ones"
        )
    merged = stored_spec.configs()[0].with_loading_attributes(user_spec.default)
    if stored_spec.modules is not None:
        stored_spec._saved_configs = [merged]  # type: ignore[attr-defined]
        return stored_spec, True
    return Recipe(default=merged), True


def _as_recipe(value: Any) -> Recipe:
    if isinstance(value, Recipe):
        return value
    if isinstance(value, QuantConfig):
        return Recipe(default=value)
    if isinstance(value, Mapping) and (value.get("quant_method") == RECIPE_METHOD or "rules" in value):
        return Recipe.from_dict(value)
    return Recipe(default=QuantConfig.from_dict(value))


def _resolve_dtype(dtype: Any, model_config) -> torch.dtype:
    value = dtype if dtype not in (None, "auto") else getattr(model_config, "dtype", None)
    if value is None:
        return torch.float32
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
    return value


# -- the skeleton and who owns what ---------------------------------------------------------------------------


def _build_skeleton(model_class: type | None, model_config, dtype: torch.dtype, model_kwargs: dict[str, Any]):
    import transformers
    from accelerate import init_empty_weights

    if model_class is None:
        names = getattr(model_config, "architectures", None) or []
        model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
        if model_class is None:
            model_class = transformers.AutoModel._model_mapping.get(type(model_config), None)  # type: ignore[attr-defined]
        if model_class is None:
            raise ConfigError(
                f"config.json names architectures {names}, none of which transformers "
                f"{transformers.__version__} provides; pass model_class= or upgrade transformers"
            )
    # Parameters go to meta (no memory); buffers stay real so the ones computed in __init__ (RoPE frequencies)
    # need no re-initialisation after loading.
    with _LOAD_LOCK, init_empty_weights(include_buffers=False):
        return model_class._from_config(model_config, dtype=dtype, **model_kwargs)


class _KeyMapper:
    """Maps checkpoint keys to (module name, tensor name) in the model, adding or removing the base-model prefix."""

    def __init__(self, model: nn.Module, checkpoint_keys: Mapping[str, Any]):
        self.modules = dict(model.named_modules())
        prefix = getattr(model, "base_model_prefix", "")
        model_has_prefix = bool(prefix) and prefix in dict(model.named_children())
        self.add = self.strip = ""
        if prefix:
            checkpoint_has_prefix = any(k.startswith(prefix + ".") for k in checkpoint_keys)
            if model_has_prefix and not checkpoint_has_prefix:
                self.add = prefix + "."
            elif not model_has_prefix and checkpoint_has_prefix:
                self.strip = prefix + "."

    def split(self, key: str) -> tuple[str, str] | None:
        if self.strip and key.startswith(self.strip):
            key = key[len(self.strip) :]
        elif self.add and not self._owner(key):
            key = self.add + key
        return self._owner(key)

    def _owner(self, key: str) -> tuple[str, str] | None:
        parts = key.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            module_name = ".".join(parts[:cut])
            if module_name in self.modules:
                return module_name, ".".join(parts[cut:])
        return None


def _assign(spec: Recipe | None, model: nn.Module, candidates: list[str], keys: _KeyMapper, context: LoadContext):
    """Module -> config, and one unit per (backend, config) with its context."""
    if spec is None:
        return {}, []
    applied = _assignment(spec, model, candidates)
    missing = sorted(set(applied) - set(keys.modules))
    if missing:
        raise CheckpointError(
            f"the stored recipe names modules the model lacks: {missing[:5]}", file=str(context.source)
        )
    tensor_names: dict[str, set[str]] = {}
    for key in context.checkpoint.tensors:
        split = keys.split(key)
        if split and split[0] in applied:
            tensor_names.setdefault(split[0], set()).add(split[1])
    units = []
    for config in spec.configs():
        modules = tuple(name for name in candidates if applied.get(name) is config) or tuple(
            name for name, c in applied.items() if c is config
        )
        if not modules:
            continue
        registered = plugins.backend_for(config.quant_method)
        module_keys = {name: frozenset(tensor_names.get(name, ())) for name in modules}
        units.append(_Unit(registered, config, context.for_backend(registered.distribution, modules, module_keys)))
    return applied, units


def _candidates(model: nn.Module) -> list[str]:
    """Names of the modules a backend may own: every ``nn.Linear`` and transformers ``Conv1D``, in model order."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _assignment(spec: Recipe, model: nn.Module, candidates: list[str]) -> dict[str, QuantConfig]:
    """Module -> config for the candidates ``spec`` quantizes, keeping what transformers keeps in full precision."""
    from transformers.quantizers.base import get_keys_to_not_convert

    always_keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    applied, unmatched = spec.assign(candidates, get_keys_to_not_convert(model), always_keep)
    for pattern in unmatched:
        logger.warning("recipe rule %r matched no module of %s", pattern, type(model).__name__)
    return applied


# -- device maps and memory ------------------------------------------------------------------------------------


def _initial_device_map(device_map: Any, model: nn.Module, dtype: torch.dtype, max_memory: Any) -> dict[str, Any]:
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, Mapping):
        return dict(device_map)
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        device = torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device_map {device_map!r} asks for CUDA but no CUDA device is available; use 'cpu'")
        return {"": str(device)}
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = getattr(model, "_no_split_modules", None) or []
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )  # fmt: skip
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def _check_device_map(device_map: Mapping[str, Any]) -> None:
    """Refuse, before any weight is read, a placement no device here can serve, naming the module and the device."""
    for module, device in device_map.items():
        where = f"module {module!r}" if module else "the whole model"
        if device == "disk":
            raise ConfigError(
                f"device_map puts {where} on 'disk'; qcore does not offload to disk. Give it more max_memory, a "
                f"smaller preset, or place it on 'cpu'"
            )
        try:
            target = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"device_map puts {where} on {device!r}, which is not a device; use 'cpu' or 'cuda:N'"
            ) from None
        if target.type == "cuda" and (
            not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()
        ):
            raise ConfigError(
                f"device_map puts {where} on {device!r} but this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); place it on 'cpu' or on an existing GPU"
            )


def estimate_nbytes(model: nn.Module, applied: Mapping[str, QuantConfig], dtype: torch.dtype) -> dict[str, int]:
    """Bytes each top-level placement needs: module name -> bytes, with quantized Linears at their packed size."""
    sizes: dict[str, int] = {}
    element = torch.tensor([], dtype=dtype).element_size()
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        config = applied.get(name)
        total = 0
        for param_name, param in own:
            if config is not None and param_name == "weight" and param.dim() == 2:
                out_features, in_features = param.shape
                if type(module).__name__ == "Conv1D":
                    in_features, out_features = param.shape
                total += config.quantized_nbytes(out_features, in_features, element)
            else:
                total += param.numel() * (param.element_size() if not param.is_floating_point() else element)
        sizes[name] = total
    return sizes


def _check_memory(model, applied, device_map, dtype, context: LoadContext) -> None:
    import psutil

    needed: dict[str, int] = {}
    for name, nbytes in estimate_nbytes(model, applied, dtype).items():
        device = str(context.device_for(name))
        needed[device] = needed.get(device, 0) + nbytes
    for device, nbytes in needed.items():
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
        else:
            free = psutil.virtual_memory().available
        if nbytes > free:
            raise InsufficientMemory(
                f"the model needs about {_size(nbytes)} on {device} but only {_size(free)} is free; choose a smaller "
                f"preset, spread it with device_map='auto', or pass check_memory=False to try anyway",
                device=device,
                needed=nbytes,
                available=free,
            )


def _size(nbytes: int) -> str:
    """``"1.50 GiB"``; a count under 1 KiB in words, as the memory message reads it (``"1000 bytes is free"``)."""
    from qcore.sizes import format_nbytes

    return f"{nbytes} bytes" if nbytes < 1024 else format_nbytes(nbytes)


# -- phase 4: streaming -----------------------------------------------------------------------------------------


def _stream(
    model, reader: CheckpointReader, keys: _KeyMapper, owner_of, context: LoadContext, progress, skip: set[str]
) -> list[str]:
    unexpected = []
    total = len(reader.tensors) - len(skip)
    wanted = set(reader.tensors) - skip if skip else None  # tensors with no place are never read
    release = _HeapRelease()
    for done, (key, tensor) in enumerate(reader.stream(wanted), start=1):
        split = keys.split(key)
        if split is None:
            unexpected.append(key)
            continue
        module_name, tensor_name = split
        module = keys.modules[module_name]
        unit = owner_of.get(module_name)
        result = None
        if unit is not None:
            result = _run(
                "load_weight", unit.registered, f"{module_name}.{tensor_name}",
                config=unit.config, context=unit.context, model=model,
                module_name=module_name, tensor_name=tensor_name, tensor=tensor,
            )  # fmt: skip
            if result is not None and not isinstance(result, Mapping):
                raise PluginError(
                    unit.name, "load_weight", f"{module_name}.{tensor_name}",
                    TypeError(f"returned {type(result).__name__}, not a dict of attributes or None"),
                )  # fmt: skip
        if result is None:
            if not _place_plain(module, tensor_name, tensor, context.device_for(module_name), reader, key):
                unexpected.append(key)
            placed = [module._parameters.get(tensor_name, module._buffers.get(tensor_name))]
        else:
            for attribute, value in result.items():
                _set(module, attribute, value)
            placed = list(result.values())
        if result != {} and not _views_storage_of(placed, tensor):
            reader.release(key)  # converted: its stored bytes are no longer needed in memory
        if unit is not None:
            release.after(tensor.numel() * tensor.element_size())
        del tensor, result, placed
        if progress is not None:
            progress(done, total, key)
    return unexpected


def _views_storage_of(values: list[Any], tensor: torch.Tensor) -> bool:
    """Whether any of ``values`` is ``tensor`` or a view of its memory (so it was kept as stored)."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == pointer for v in values)


class _HeapRelease:
    """Hands the heap that conversions freed back to the system every so often during a load (glibc only).

    A backend's conversion allocates full-precision temporaries several times the tensor's size; freed, they stay
    in malloc's heap, and over a load that heap grows to hundreds of MB of free but resident memory, more than the
    quantized model itself. ``malloc_trim`` returns it, at a cost of about a millisecond a call.
    """

    EVERY_NBYTES = 64 * 2**20

    def __init__(self) -> None:
        self.pending = 0
        self.trim = _malloc_trim()

    def after(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.trim is not None and self.pending >= self.EVERY_NBYTES:
            self.trim(0)
            self.pending = 0


def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_FLOATING = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def _check_fit(
    model: nn.Module, keys: _KeyMapper, reader: CheckpointReader, owned: set[str], pre_quantized: bool
) -> set[str]:
    """Check every checkpoint tensor against the skeleton, from headers alone, before any weight is read.

    Raises :class:`CheckpointError` for a tensor whose shape or kind (floating or not) does not fit its slot, and
    returns the keys with no slot at all (unexpected), which are then neither read nor handed to a backend. The
    stored tensors of a pre-quantized module are the backend's own form, so only it can judge them.
    """
    no_place = set()
    for key, info in reader.tensors.items():
        split = keys.split(key)
        if split is None:
            no_place.add(key)
            continue
        module_name, name = split
        if pre_quantized and module_name in owned:
            continue
        module = keys.modules[module_name]
        if "." in name or (name not in module._parameters and name not in module._buffers):
            no_place.add(key)
            continue
        current = module._parameters[name] if name in module._parameters else module._buffers[name]
        if current is None:
            continue
        if tuple(current.shape) != info.shape:
            raise CheckpointError(
                f"shape {info.shape} does not fit the model's {tuple(current.shape)}; the checkpoint belongs to "
                f"another model or config.json does not match the weights",
                file=str(info.file),
                tensor=key,
            )
        if current.is_floating_point() != (info.dtype in _FLOATING):
            raise CheckpointError(
                f"dtype {info.dtype} does not fit the model's {current.dtype}; the checkpoint is not for this model",
                file=str(info.file),
                tensor=key,
            )
    return no_place


def _place_plain(module: nn.Module, name: str, tensor: torch.Tensor, device, reader, key: str) -> bool:
    """Place an unquantized tensor where the skeleton expects it, in the skeleton's dtype. False if no such slot."""
    current = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
    if "." in name or (name not in module._parameters and name not in module._buffers):
        return False
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"shape {tuple(tensor.shape)} does not fit the model's {tuple(current.shape)}; the checkpoint belongs to "
            f"another model or config.json does not match the weights",
            file=str(reader.tensors[key].file if key in reader.tensors else reader.directory),
            tensor=key,
        )
    if current is not None and current.is_floating_point() != tensor.is_floating_point():
        raise CheckpointError(
            f"dtype {tensor.dtype} does not fit the model's {current.dtype}; the checkpoint is not for this model",
            file=str(reader.tensors[key].file if key in reader.tensors else reader.directory),
            tensor=key,
        )
    target_dtype = current.dtype if current is not None and tensor.is_floating_point() else tensor.dtype
    value = tensor.to(device=device, dtype=target_dtype)
    if name in module._parameters:
        requires_grad = current.requires_grad if current is not None else value.is_floating_point()
        module._parameters[name] = nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    else:
        module._buffers[name] = value
    return True


def _set(module: nn.Module, attribute: str, value: Any) -> None:
    owner_path, _, name = attribute.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if name in owner._parameters and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    if name in owner._buffers and not isinstance(value, nn.Parameter):
        owner._buffers[name] = value
    else:
        # nn.Module.__setattr__ registers a Parameter even where the module held a plain attribute of that name
        # (HQQLinear keeps ``bias = None`` as one), and drops the stale entry.
        setattr(owner, name, value)


def _report_unexpected(unexpected: list[str], allow: bool, reader: CheckpointReader) -> None:
    unexpected = [k for k in unexpected if not k.endswith(_IGNORED_UNEXPECTED)]
    if not unexpected:
        return
    message = f"{len(unexpected)} checkpoint tensor(s) have no place in the model: {unexpected[:8]}"
    if not allow:
        raise CheckpointError(
            message + "; the checkpoint does not match config.json. Pass allow_unexpected=True to load anyway",
            file=str(reader.directory),
            tensor=unexpected[0],
        )
    logger.warning(message)


def _check_missing(model: nn.Module, reader: CheckpointReader) -> None:
    missing = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) the model needs are not in the checkpoint: {missing[:8]}; the checkpoint is "
            f"incomplete or for another architecture",
            file=str(reader.directory),
            tensor=missing[0],
        )


# -- finishing -----------------------------------------------------------------------------------------------


def _mark_quantized(
    model, spec: Recipe | None, applied: Mapping[str, QuantConfig], candidates: list[str], context: LoadContext
) -> None:
    """Record what was applied, where transformers and the ecosystem (PEFT, Trainer) look for it."""
    model.qcore_kernels = context.kernels
    if spec is None or not applied:
        return
    from qcore._hf import QcoreQuantizer

    plain = _as_plain_config(spec, model, applied, candidates)
    quant_dict = plain.to_dict() if plain is not None else spec.to_dict(applied)
    model.qcore_applied = dict(applied)
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            module.config.quantization_config = quant_dict
            module.config._is_quantized = True
    model.hf_quantizer = QcoreQuantizer(quant_dict, plain)
    model.is_quantized = True
    model.quantization_method = model.hf_quantizer.quantization_config.quant_method


def _as_plain_config(
    spec: Recipe, model: nn.Module, applied: Mapping[str, QuantConfig], candidates: list[str]
) -> QuantConfig | None:
    """The one config that, read by transformers or qcore, quantizes exactly the modules in ``applied``.

    ``None`` when the model mixes configs (it is then saved as a recipe). A single config whose own skip rules
    would pick other modules gets the full-precision modules written into its skip list.
    """
    single = spec.single_config(applied)
    if single is None:
        return None
    if _assignment(Recipe(default=single), model, candidates).keys() == applied.keys():
        return single
    if single.skip_field is None:
        return None
    keep = [name for name in candidates if name not in applied]
    return dataclasses.replace(single, **{single.skip_field: keep})


def _load_generation_config(model, source: Path) -> None:
    if (source / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(source)


# -- calling hooks -------------------------------------------------------------------------------------------


def _run(phase: str, registered, where: str | None, **kwargs: Any) -> Any:
    """Call ``phase`` on one backend (observers still see it) and turn its failures into :class:`PluginError`."""
    try:
        return plugins.phase_caller(phase, registered.plugin_name)(**kwargs)
    except QcoreError:
        raise
    except Exception as error:
        context = kwargs.get("context")
        module = where or (", ".join(context.modules[:3]) if context is not None and context.modules else None)
        raise PluginError(_culprit(error, registered), phase, module, error) from error


def _culprit(error: BaseException, registered) -> str:
    """The plugin whose code raised: the innermost traceback frame inside a registered plugin's package."""
    packages = plugins.plugin_packages()
    culprit = registered.distribution
    tb = error.__traceback__
    while tb is not None:
        package = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        if package in packages and package != "qcore":
            culprit = packages[package]
        tb = tb.tb_next
    return culprit


def _first(result: Any) -> Any:
    if isinstance(result, list):
        return next((r for r in result if r is not None), None)
    return result
