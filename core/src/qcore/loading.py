"""``qcore.from_pretrained``: the streaming quantized loader, running the six phases top to bottom.

    config.json -> configs -> 1 validate -> weights located, headers checked -> skeleton on meta
    -> modules assigned to backends -> 2 update_device_map -> memory guard -> 3 preprocess_model
    -> 4 load_weight, tensor by tensor, shard by shard -> tie weights -> 5 postprocess -> missing check
    -> 6 optimize_runtime -> model

Peak memory stays near the quantized model plus the tensor in hand: the skeleton holds no weights, each tensor is
read from a memory map, converted and placed on its device, and dropped before the next is read.

The weights come from a :class:`~qcore.checkpoint.CheckpointSource` that :func:`~qcore.checkpoint.open_checkpoint`
picks (safetensors, opt-in pickle, or a plugin's container reader such as GGUF's, opened before ``validate``
when the container carries the config). With a config that needs calibration, phase 4 streams the model one decoder
block at a time instead (:func:`_stream_calibrated`, with :mod:`qcore.calibration`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore import cache as quantized_cache
from qcore import placement, plugins
from qcore.checkpoint import CheckpointSource, open_checkpoint
from qcore.config import QuantConfig
from qcore.context import LoadContext
from qcore.errors import CheckpointError, ConfigError, InsufficientMemory, PluginError, QcoreError
from qcore.memory import release_heap
from qcore.placement import STRATEGIES
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
    src: str | os.PathLike[str] | CheckpointSource,
    quantization_config: QuantConfig | Recipe | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | int | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, int | str] | None = None,
    model_class: type | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    calibration: Any = None,
    allow_pickle: bool = False,
    allow_unexpected: bool = False,
    check_memory: bool = True,
    mmap_weights: bool = False,
    progress: Any = None,
    cache: bool | str | os.PathLike[str] | None = None,
    **model_kwargs: Any,
):
    """Load a transformers model from ``src``, quantizing its weights while loading.

    Safe to call from several threads; the loads run one at a time (building a transformers model patches
    process-wide state). Load in separate processes to load in parallel.

    :param src: a local checkpoint directory, a weight file in one (``model.gguf``: any container an installed
        plugin reads), a hub id (``"org/name"``, resolved through huggingface_hub: config.json first, then only the
        weight files needed), or a :class:`~qcore.checkpoint.CheckpointSource` (``qcore convert`` passes one).
    :param quantization_config: a :class:`~qcore.QuantConfig`, a :class:`~qcore.Recipe`, or the dict transformers writes
        as ``quantization_config`` (``{"quant_method": ...}``; ``{"rules": [...]}`` for a recipe). ``None`` loads a
        plain checkpoint unquantized and a pre-quantized checkpoint as it was saved. Given with a pre-quantized
        checkpoint, only its loading attributes (e.g. a compute dtype) apply.
    :param dtype: dtype of the weights kept in full precision; defaults to the checkpoint's.
    :param device_map: ``"cpu"``, ``"cuda:0"``, a GPU index, ``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
        ``"sequential"`` or an accelerate-style dict. The automatic strategies place each module by its quantized
        size, keeping a reserve free on each device (:mod:`qcore.placement`).
    :param max_memory: per-device budgets for the automatic strategies (``{0: "24GiB", "cpu": "64GiB"}``); by
        default the free memory of each device.
    :param model_class: the transformers class to build; by default the one config.json's ``architectures`` names.
    :param gguf_file: the weight file to read in ``src`` (a directory or hub id), as transformers spells it; for
        any container a plugin reads. With a hub id, only that file is downloaded.
    :param calibration: calibration data for a config that needs it (GPTQ): texts, or token ids (a ``[n, tokens]``
        tensor or a list of 1-D ones); by default :func:`qcore.corpus.calibration_texts`. Ignored otherwise.
    :param allow_pickle: load ``.bin``/``.pt`` weights (with ``torch.load(weights_only=True)``) instead of refusing.
    :param allow_unexpected: only warn about checkpoint tensors the model has no place for.
    :param check_memory: refuse up front, with both numbers, a load that cannot fit in the target devices' memory.
    :param mmap_weights: keep the tensors loaded as stored (unquantized ones, pre-quantized codes) as copy-on-write
        views of the files (safetensors, GGUF) instead of reading them into memory of their own. The views cost no
        anonymous memory (the pages are the file's, shared with other processes, dropped under pressure), but the
        model then reads the files for its whole life: rewriting one in place changes its outputs, truncating one
        kills the process (SIGBUS). Only for files nothing will change (docs/security.md has the measured costs).
    :param progress: a callable ``(done, total, name)`` called after each tensor (the CLI draws a bar with it).
    :param cache: keep the result of an on-the-fly load in the cache of quantized copies and load it from there
        next time (:mod:`qcore.cache`): ``True`` for ``QCORE_CACHE_DIR`` (default ``~/.cache/qcore/quantized``), a
        path for another directory, ``False`` never; ``None`` (the default) caches only when ``QCORE_CACHE_DIR``
        is set. Plain and pre-quantized loads never use it.
    :param model_kwargs: passed to the model's constructor (e.g. ``attn_implementation``).
    :returns: a ``transformers.PreTrainedModel`` in eval mode.
    """
    # A weight file, or a container that carries its own config, is opened (headers only) before validate.
    source, reader = _locate(src, revision, gguf_file, allow_pickle)
    container_config = reader.model_config() if reader is not None else None
    model_config = container_config or _read_model_config(source, model_kwargs)
    if container_config is not None and model_kwargs.pop("trust_remote_code", False):
        raise ConfigError("qcore never runs a checkpoint's own code: trust_remote_code is not supported")
    spec, pre_quantized = _resolve_spec(model_config, quantization_config)
    dtype = _resolve_dtype(dtype, model_config)

    # Phase 1: validate every (backend, config) before a single weight is read or downloaded.
    requested_map = _requested_device_map(device_map)
    context = LoadContext(source, model_config, pre_quantized, dtype, requested_map, None)  # type: ignore[arg-type]
    configs = spec.configs() if spec is not None else []
    for config in configs:
        registered = plugins.ensure_available(config.quant_method)
        _run("validate", registered, None, config=config, context=context.for_backend(registered.distribution, (), {}))

    if reader is None:
        source = _fetch_weights(src, source, revision)
        reader = open_checkpoint(source, allow_pickle=allow_pickle)
    reader.mapped = mmap_weights
    context.source, context.checkpoint = source, reader
    if spec is not None and not pre_quantized and quantized_cache.wanted(cache):
        # Validated and located: from here a verified cached copy replaces the quantization (see qcore.cache).
        return quantized_cache.load_or_build(
            lambda: from_pretrained(
                src, quantization_config, dtype=dtype, device_map=device_map, max_memory=max_memory,
                model_class=model_class, revision=revision, gguf_file=gguf_file, calibration=calibration,
                allow_pickle=allow_pickle, allow_unexpected=allow_unexpected, check_memory=check_memory,
                progress=progress, cache=False, **model_kwargs,
            ),
            source, quantized_cache.source_files(source, list(reader.files)),
            {"spec": spec.to_dict(), "calibration": quantized_cache.describe_calibration(calibration)},
            sorted({config.quant_method for config in spec.configs()}),
            cache=cache, dtype=dtype, model_kwargs=model_kwargs,
            load_kwargs={"device_map": device_map, "max_memory": max_memory, "check_memory": check_memory},
        )  # fmt: skip

    model = _build_skeleton(model_class, model_config, dtype, model_kwargs, checkpoint=reader)
    keys = _KeyMapper(model, reader.tensors)
    candidates = _candidates(model)
    applied, units = _assign(spec, model, candidates, keys, context)
    if not pre_quantized:  # every tensor is full precision: checked against the skeleton before anything else
        no_place = _check_headers(model, keys, reader, units, pre_quantized, allow_unexpected)
    calibrating = [unit for unit in units if unit.config.needs_calibration and not pre_quantized]
    if calibrating:
        from qcore import calibration as calibrate
        from qcore.memory import map_large_allocations

        map_large_allocations()  # calibration frees large float32 temporaries per Linear (Hessians, factors)

        blocks = calibrate.decoder_blocks(model, candidates)
        for unit in calibrating:
            unit.context.calibrating = True
            unit.context._blocks = calibrate.modules_by_block(unit.context.modules, blocks)
        sequences = calibrate.calibration_batch(calibration, source, calibrate.context_length(model_config))
    elif calibration is not None:
        logger.warning("calibration data given, but no config of this load needs calibration; it is not used")

    # Phase 2: device placement.
    device_map = _initial_device_map(device_map, model, dtype, max_memory, applied, pre_quantized)
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
    _check_left_for_calibration(model, calibrating, keys)
    taken = _taken(units)
    if pre_quantized:
        # A backend may hold a module in its stored form that it takes only now (a tied embedding kept quantized):
        # the headers are checked once every owner is known, still before any tensor is read.
        no_place = _check_headers(model, keys, reader, units, pre_quantized, allow_unexpected)

    # Phase 4: stream every tensor through its owner (by decoder block, for a calibrating load).
    keys.modules = dict(model.named_modules())  # preprocess_model replaced some
    owner_of = {name: unit for unit in units for name in unit.context.modules}
    counter = _Progress(progress, len(reader.tensors) - len(no_place))
    if calibrating:
        unexpected = _stream_calibrated(model, reader, keys, owner_of, context, counter, no_place, blocks, sequences)
    else:
        unexpected = _stream(model, reader, keys, owner_of, context, counter, skip=no_place)
    _report_unexpected(unexpected, allow_unexpected, reader)
    _tie_weights(model, taken)

    # Phase 5: finish.
    for unit in units:
        unit.context.check_gathered()
        _run("postprocess", unit.registered, None, config=unit.config, context=unit.context, model=model)
    _check_missing(model, reader)

    _mark_quantized(model, spec, applied, candidates, context, taken)
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
    gguf_file: str | None = None,
    **model_kwargs: Any,
) -> LoadPlan:
    """What :func:`from_pretrained` would build from ``src``, worked out from config.json alone.

    No weight file is read, and for a hub id only config.json is downloaded. The arguments mean what they mean for
    :func:`from_pretrained`; one plan answers for any number of quantization configs (``qcore estimate`` and
    ``qcore recommend`` compare presets with it).
    """
    source, reader = _locate(src, revision, gguf_file, allow_pickle=False)
    model_config = (reader.model_config() if reader is not None else None) or _read_model_config(source, model_kwargs)
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

    def fallbacks(self, quantization_config: QuantConfig | Recipe | Mapping[str, Any] | None = None) -> dict[str, str]:
        """Module name -> the fallback its config would take for it (:meth:`QuantConfig.shape_fallback`), for the
        modules whose shape the config's settings do not fit."""
        from transformers.pytorch_utils import Conv1D

        found = {}
        for name, config in self.assign(quantization_config).items():
            module = self.model.get_submodule(name)
            out_features, in_features = module.weight.shape
            if isinstance(module, Conv1D):
                in_features, out_features = module.weight.shape
            what = config.shape_fallback(name, out_features, in_features)
            if what is not None:
                found[name] = what
        return found

    def _tied_targets(self) -> set[str]:
        return set(getattr(self.model, "all_tied_weights_keys", None) or {})


# -- source and configs --------------------------------------------------------------------------------------


def _locate(
    src: Any, revision: str | None, weights_file: str | None, allow_pickle: bool
) -> tuple[Path, CheckpointSource | None]:
    """The checkpoint directory, and its weights when they must be opened before config.json is read.

    They must for a :class:`CheckpointSource` given directly, a weight file, a directory with ``weights_file`` named
    (a hub id then downloads only that file), and a directory without config.json holding a file a plugin's reader
    takes (a GGUF file carries the model's config).
    """
    if isinstance(src, CheckpointSource):
        return src.directory, src
    path = Path(src)
    if path.is_file():
        return path.parent, open_checkpoint(path, allow_pickle=allow_pickle)
    if path.is_dir():
        if weights_file is not None:
            return path, open_checkpoint(path, weights_file=weights_file, allow_pickle=allow_pickle)
        if not (path / "config.json").is_file() and _has_container_file(path):
            return path, open_checkpoint(path, allow_pickle=allow_pickle)
        return path, None
    if weights_file is not None and isinstance(src, str) and src.count("/") == 1:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(src, weights_file, revision=revision))
        except Exception as error:  # huggingface_hub's errors share no base; each means "cannot fetch it"
            raise CheckpointError(
                f"cannot fetch {weights_file!r} of hub id {src!r} ({type(error).__name__}: {error}); check the id, "
                f"the file name, your network, or HF_HUB_OFFLINE with a populated cache",
                file=str(src),
            ) from None
        return file.parent, open_checkpoint(file, allow_pickle=allow_pickle)
    return _resolve_source(src, revision), None


def _has_container_file(directory: Path) -> bool:
    readers = plugins.readers()
    return any(path.suffix.lower() in readers for path in directory.iterdir() if path.is_file())


def _resolve_source(src: str | os.PathLike[str], revision: str | None) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if isinstance(src, str) and src.count("/") == 1 and not path.exists() and _is_hub_id(src):
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


def _is_hub_id(src: str) -> bool:
    """Whether ``src`` is spelled as a hub repository id (``org/name``), by huggingface_hub's own rule."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(src)
    except HFValidationError:
        return False
    return True


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
    except OSError as error:  # permissions, a disk error: the file cannot be read at all
        raise CheckpointError(
            f"cannot be read ({type(error).__name__}: {error.strerror or error}); check its permissions",
            file=str(path),
        ) from None
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
    _check_dtype_names(parsed, path)
    # False is the only value qcore supports, so it is accepted and dropped rather than passed to the model class.
    if model_kwargs.pop("trust_remote_code", False):
        raise ConfigError("qcore never runs a checkpoint's own code: trust_remote_code is not supported")
    try:
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as error:  # transformers and huggingface_hub validate with exception types sharing no base
        raise ConfigError(
            f"{path}: not a usable transformers config ({type(error).__name__}: {error}); fix the field it names or "
            f"regenerate config.json"
        ) from None
    # AutoGPTQ's older checkpoints describe their quantization in quantize_config.json only (its quant_method implied).
    legacy = source / "quantize_config.json"
    if parsed.get("quantization_config") is None and legacy.is_file():
        stored = _read_json_object(legacy)
        model_config.quantization_config = {"quant_method": "gptq", **stored}
    return model_config


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise ConfigError(
            f"{path}: cannot be read as JSON ({type(error).__name__}: {error}); fix or remove it"
        ) from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{path}: must hold a JSON object, not {type(parsed).__name__}; fix or remove it")
    return parsed


#: The dtype names config.json may give (``dtype``, ``torch_dtype``). transformers turns the name into a dtype with
#: ``getattr(torch, name)``, and torch's module ``__getattr__`` imports submodules and calls functions for some
#: names, so only these names reach it.
_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")


def _check_dtype_names(value: Any, path: Path, where: str = "") -> None:
    """Refuse a ``dtype``/``torch_dtype`` anywhere in config.json (sub-configs too) that is not a known dtype name."""
    if isinstance(value, dict):
        for key, item in value.items():
            field = f"{where}.{key}" if where else str(key)
            if key in ("dtype", "torch_dtype") and item is not None and item not in _DTYPE_NAMES:
                raise ConfigError(
                    f"{path}: field {field!r} must be a dtype name, one of {list(_DTYPE_NAMES)}, got {item!r}; fix "
                    f"or regenerate config.json"
                )
            _check_dtype_names(item, path, field)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_dtype_names(item, path, f"{where}[{index}]")


def _resolve_spec(model_config, user: Any) -> tuple[Recipe | None, bool]:
    """The recipe to apply and whether the checkpoint is pre-quantized (the merge rule of the reference workflow)."""
    stored = getattr(model_config, "quantization_config", None)
    if stored is not None and not isinstance(stored, Mapping):
        stored = stored.to_dict()
    user_spec = _as_recipe(user) if user is not None else None
    if stored is None:
        return user_spec, False
    try:
        stored_spec = _as_recipe(dict(stored), stored=True)
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


def _as_recipe(value: Any, *, stored: bool = False) -> Recipe:
    if isinstance(value, Recipe):
        return value
    if isinstance(value, QuantConfig):
        return Recipe(default=value)
    if isinstance(value, Mapping) and (value.get("quant_method") == RECIPE_METHOD or "rules" in value):
        return Recipe.from_dict(value, stored=stored)
    return Recipe(default=QuantConfig.from_dict(value))


def _resolve_dtype(dtype: Any, model_config) -> torch.dtype:
    value = dtype if dtype not in (None, "auto") else getattr(model_config, "dtype", None)
    if value is None:
        return torch.float32
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        value = getattr(torch, name) if name in _DTYPE_NAMES else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype such as torch.bfloat16, got {dtype!r}")
    return value


# -- the skeleton and who owns what ---------------------------------------------------------------------------


def _build_skeleton(
    model_class: type | None,
    model_config,
    dtype: torch.dtype,
    model_kwargs: dict[str, Any],
    checkpoint: CheckpointSource | None = None,
):
    """The model on the meta device, as config.json describes it; with ``checkpoint``, only once a probe has shown
    that config.json makes it no larger than what the checkpoint's headers hold (:func:`_check_skeleton_bound`)."""
    import transformers
    from accelerate import init_empty_weights

    if model_class is None:
        model_class = _architecture(model_config)
        if model_class is None:
            model_class = transformers.AutoModel._model_mapping.get(type(model_config), None)  # type: ignore[attr-defined]
        if model_class is None:
            raise ConfigError(
                f"config.json names no architecture and transformers {transformers.__version__} has no base model "
                f"for model_type {model_config.model_type!r}; pass model_class= or upgrade transformers"
            )
    if checkpoint is not None:
        _check_skeleton_bound(model_class, model_config, dtype, model_kwargs, checkpoint)
    # Parameters go to meta (no memory); buffers stay real so the ones computed in __init__ (RoPE frequencies)
    # need no re-initialisation after loading.
    try:
        with _LOAD_LOCK, init_empty_weights(include_buffers=False):
            return model_class._from_config(model_config, dtype=dtype, **model_kwargs)
    except QcoreError:
        raise
    except Exception as error:  # a config.json value the model's constructor rejects (an unknown activation...)
        raise ConfigError(
            f"config.json: transformers cannot build {model_class.__name__} from it ({type(error).__name__}: "
            f"{error}); fix the field it names or regenerate config.json"
        ) from None


def _architecture(model_config) -> type | None:
    """The model class config.json's ``architectures`` names, accepted only if it is one of the transformers model
    classes for the config's ``model_type`` (looked up in transformers' own tables, never by importing a name from
    the file); ``None`` when it names none."""
    import transformers
    from transformers.models.auto import modeling_auto

    names = getattr(model_config, "architectures", None)
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(
            f"config.json: field 'architectures' must be a list of model class names such as "
            f'["LlamaForCausalLM"], got {names!r}'
        )
    model_type = getattr(model_config, "model_type", None)
    known: set[str] = set()
    for table_name, table in vars(modeling_auto).items():
        if table_name.startswith("MODEL_") and table_name.endswith("_MAPPING_NAMES") and isinstance(table, Mapping):
            entry = table.get(model_type, ())
            known.update([entry] if isinstance(entry, str) else entry)
    for name in names:
        if name not in known or not isinstance(getattr(transformers, name, None), type):
            raise ConfigError(
                f"config.json: field 'architectures' names {name!r}, which is not a transformers model class for "
                f"model_type {model_type!r} (such as {', '.join(sorted(known)[:6]) or 'none'}); fix it, or pass "
                f"model_class="
            )
    return getattr(transformers, names[0]) if names else None


#: The most a skeleton may exceed its checkpoint by: a 2-bit checkpoint loaded in float32 is 16x smaller than its
#: model, statistics aside; anything past this is config.json describing a model the weights do not hold.
_SKELETON_OVER_CHECKPOINT = 32
#: Skeletons this small are never refused (models whose weights are mostly computed buffers or tied).
_SKELETON_FLOOR_NBYTES = 256 * 2**20


def _check_skeleton_bound(model_class: type, model_config, dtype: torch.dtype, model_kwargs, checkpoint) -> None:
    """Refuse, before the skeleton is built, a config.json that would make it larger than the checkpoint allows.

    Building the skeleton allocates each parameter once (then moves it to meta), keeps every buffer, and costs
    time and Python objects per layer, all from config.json alone: a hostile or corrupt one (20000 layers over two
    stored, 2**29 positions) would allocate gigabytes before any check. So a probe with one decoder layer is built
    entirely on the meta device (nothing allocated), its layer lists are compared with the layers the headers hold,
    and its size, projected to the declared layer count, with the checkpoint's bytes.

    :raises ConfigError: naming ``num_hidden_layers``, or the tensor and the config field that sizes it.
    """
    import copy

    declared = getattr(model_config, "num_hidden_layers", None)
    probe_config = copy.deepcopy(model_config)
    if isinstance(declared, int) and declared > 1:
        probe_config.num_hidden_layers = 1
        if isinstance(getattr(probe_config, "layer_types", None), list):
            probe_config.layer_types = probe_config.layer_types[:1]
    try:
        with _LOAD_LOCK, torch.device("meta"):
            probe = model_class._from_config(probe_config, dtype=dtype, **model_kwargs)
    except Exception as error:  # a config that needs all its layers to build: the full build reports what is wrong
        logger.debug("skeleton probe of %s not built (%s); building it unchecked", model_class.__name__, error)
        return
    layer_lists = [
        name
        for name, module in probe.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == 1 and isinstance(declared, int) and declared > 1
    ]
    keys = _KeyMapper(probe, checkpoint.tensors)
    for layers in layer_lists:
        stored = set()
        for key in checkpoint.tensors:
            split = keys.split(key)
            if split is None:
                continue
            module_name, rest = split
            if module_name.startswith(layers + "."):
                stored.add(module_name[len(layers) + 1 :].split(".")[0])
            elif module_name == layers and rest.split(".")[0].isdigit():
                stored.add(rest.split(".")[0])
        if declared > len(stored):
            raise ConfigError(
                f"config.json declares num_hidden_layers = {declared}, but the checkpoint's headers hold "
                f"{len(stored)} layer(s) under {layers!r}; config.json does not belong to these weights: fix the "
                f"field or download the checkpoint again",
            )
    element = torch.tensor([], dtype=dtype).element_size()
    sizes = {}
    for name, tensor in (*probe.named_parameters(), *probe.named_buffers()):
        per_layer = declared if any(name.startswith(layers + ".0.") for layers in layer_lists) else 1
        width = element if tensor.is_floating_point() else tensor.element_size()
        sizes[name] = tensor.numel() * width * per_layer
    limit = max(_SKELETON_FLOOR_NBYTES, _SKELETON_OVER_CHECKPOINT * checkpoint.total_nbytes())
    if sum(sizes.values()) > limit:
        largest = max(sizes, key=sizes.__getitem__)
        shape = tuple(dict((*probe.named_parameters(), *probe.named_buffers()))[largest].shape)
        fields = _config_fields_sizing(model_config, shape)
        raise ConfigError(
            f"config.json describes a model of {_size(sum(sizes.values()))}, more than {_SKELETON_OVER_CHECKPOINT}x "
            f"the {_size(checkpoint.total_nbytes())} its checkpoint holds; the largest part is {largest!r} of shape "
            f"{shape}{f', sized by {fields}' if fields else ''}. config.json does not belong to these weights: fix "
            f"the field or download the checkpoint again"
        )


def _config_fields_sizing(model_config, shape: tuple[int, ...]) -> str:
    """The config.json fields whose value gives ``shape``'s largest dimension (the likely culprit), for a message.

    A little below it counts too: some tables add a few rows to the configured count (OPT's positions add 2).
    """
    largest = max(shape, default=0)
    names = [
        f"{name} = {value}"
        for name, value in sorted(model_config.to_dict().items())
        if isinstance(value, int) and not isinstance(value, bool) and value > 1 and largest - 2 <= value <= largest
    ]
    return ", ".join(names)


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
    not_linear = [name for name in applied if name not in set(candidates)]
    if not_linear:
        module = keys.modules[not_linear[0]]
        raise CheckpointError(
            f"the stored recipe assigns module {not_linear[0]!r} ({type(module).__name__}) to "
            f"{applied[not_linear[0]].quant_method}, but only Linear and Conv1D layers are quantized; the recipe is "
            f"corrupt or for another model: fix its 'modules' in config.json",
            file=str(context.source / "config.json"),
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
    # A module whose weight is tied to another (BERT's decoder to the word embeddings) keeps its plain weight even
    # under a config's own skip list: a quantized layer has no weight left to tie, and transformers' tie_weights fails.
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    always_keep += sorted({key.removesuffix(".weight") for pair in tied.items() for key in pair})
    applied, unmatched = spec.assign(candidates, get_keys_to_not_convert(model), always_keep)
    for pattern in unmatched:
        logger.warning("recipe rule %r matched no module of %s", pattern, type(model).__name__)
    return applied


# -- device maps and memory ------------------------------------------------------------------------------------


def _requested_device_map(device_map: Any) -> dict[str, Any]:
    """What ``validate`` sees as ``context.device_map``: the devices the caller named, and nothing to misread.

    A dict as given, ``{"": device}`` for a device string, index or ``torch.device``, and ``{}`` for the automatic
    strategies and for None, which name no device until they are resolved (before ``update_device_map``).
    """
    if isinstance(device_map, Mapping):
        return dict(device_map)
    if device_map is None or device_map in STRATEGIES:
        return {}
    return {"": device_map}


def _initial_device_map(
    device_map: Any,
    model: nn.Module,
    dtype: torch.dtype,
    max_memory: Any,
    applied: Mapping[str, QuantConfig],
    pre_quantized: bool,
) -> dict[str, Any]:
    """The map phase 2 starts from: as given, or resolved from a strategy by each module's quantized size."""
    if device_map is None:
        return {"": "cpu"}
    if isinstance(device_map, Mapping):
        return dict(device_map)
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in STRATEGIES):
        try:
            device = torch.device(device_map if not isinstance(device_map, int) else f"cuda:{device_map}")
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"device_map {device_map!r} is not a device or one of {', '.join(STRATEGIES)}; use 'cpu', 'cuda:0', "
                f"'auto' or a dict"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device_map {device_map!r} asks for CUDA but no CUDA device is available; use 'cpu'")
        return {"": str(device)}
    if not isinstance(device_map, str):
        raise ConfigError(f"device_map must be a device, a strategy or a dict, not {type(device_map).__name__}")
    sizes = placement.module_sizes(model, applied, dtype)
    in_flight = placement.in_flight_nbytes(model, applied, dtype, pre_quantized)
    return placement.place(model, sizes, device_map, max_memory, in_flight=in_flight).device_map


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


class _Progress:
    """Counts tensors across the streams of one load for the ``progress(done, total, name)`` callback."""

    def __init__(self, callback: Any, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def step(self, key: str) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total, key)


def _stream(
    model,
    reader: CheckpointSource,
    keys: _KeyMapper,
    owner_of,
    context: LoadContext,
    progress: _Progress,
    skip: set[str],
    *,
    names: set[str] | None = None,
    full_precision: frozenset[str] = frozenset(),
) -> list[str]:
    """Read the tensors (all, or ``names``), hand each to its owner's ``load_weight`` or place it; the unexpected.

    Tensors of the modules in ``full_precision`` are placed as they are even though a backend owns them (a
    calibrating backend receives them in their block).
    """
    unexpected = []
    if names is None:
        names = set(reader.tensors) - skip if skip else None  # tensors with no place are never read
    release = _HeapRelease()
    for key, tensor in reader.stream(names):
        split = keys.split(key)
        if split is None:
            unexpected.append(key)
            continue
        module_name, tensor_name = split
        module = keys.modules[module_name]
        unit = owner_of.get(module_name) if module_name not in full_precision else None
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
        stored = tensor
        if result is None:
            info = reader.tensors.get(key)
            if info is not None and not info.is_plain:  # a container's own type, for a module no backend took
                slot = module._parameters.get(tensor_name, module._buffers.get(tensor_name))
                dtype = slot.dtype if slot is not None and slot.is_floating_point() else context.dtype
                tensor = reader.to_plain(key, tensor, dtype)
            if not _place_plain(module, tensor_name, tensor, context.device_for(module_name), reader, key):
                unexpected.append(key)
            placed = [module._parameters.get(tensor_name, module._buffers.get(tensor_name))]
        else:
            for attribute, value in result.items():
                _set(module, attribute, value)
            placed = list(result.values())
        if result != {} and not _views_storage_of(placed, stored):
            reader.release(key)  # converted: its stored bytes are no longer needed in memory
        if unit is not None:
            release.after(tensor.numel() * tensor.element_size())
        del tensor, stored, result, placed
        progress.step(key)
    return unexpected


def _taken(units: list[_Unit]) -> dict[str, QuantConfig]:
    """Module -> config for the modules backends took in ``preprocess_model`` (``LoadContext.take``), each once."""
    taken: dict[str, QuantConfig] = {}
    for unit in units:
        for name in unit.context.taken:
            others = [u.name for u in units if u is not unit and name in u.context.modules]
            if others:
                wrong = ValueError(f"took module {name!r}, which {others[0]} owns")
                raise PluginError(unit.name, "preprocess_model", name, wrong)
            taken[name] = unit.config
    return taken


def _tie_weights(model: nn.Module, taken: Mapping[str, QuantConfig]) -> None:
    """transformers' ``tie_weights``, leaving out the pairs a backend took (it ties those itself: a quantized module
    has no plain weight to share)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not taken or not tied:
        model.tie_weights()
        return

    def module_of(key: str) -> str:
        return key.rpartition(".")[0]

    kept = {t: s for t, s in tied.items() if module_of(t) not in taken and module_of(s) not in taken}
    model.all_tied_weights_keys = kept
    try:
        model.tie_weights(recompute_mapping=False)
    finally:
        model.all_tied_weights_keys = tied


def _check_left_for_calibration(model: nn.Module, calibrating: list[_Unit], keys: _KeyMapper) -> None:
    """A calibrating backend must leave its modules to the core in ``preprocess_model``: they receive full-precision
    weights, which only the skeleton's own ``nn.Linear``/``Conv1D`` can hold."""
    for unit in calibrating:
        for name in unit.context.modules:
            if model.get_submodule(name) is not keys.modules[name]:
                wrong = TypeError(
                    "replaced a module that calibrate_block must receive in full precision; leave context.modules "
                    "as they are in preprocess_model when context.calibrating is true"
                )
                raise PluginError(unit.name, "preprocess_model", name, wrong)


def _stream_calibrated(
    model,
    reader: CheckpointSource,
    keys: _KeyMapper,
    owner_of: Mapping[str, _Unit],
    context: LoadContext,
    progress: _Progress,
    skip: set[str],
    blocks: list[str],
    sequences: list[torch.Tensor],
) -> list[str]:
    """Phase 4 for a calibrating load: what lies outside the decoder blocks, then each block in model order.

    Each block's tensors are read at random from the shards; the calibrating backends' modules are placed in full
    precision, ``calibrate_block`` quantizes them from the block's inputs, the quantized block is run to make the
    next block's inputs, and the full-precision tensors are released.
    """
    from qcore import calibration as calibrate

    wanted = [key for key in reader.tensors if key not in skip]
    block_of = calibrate.block_lookup(blocks)
    by_block: dict[str, set[str]] = {}
    for key in wanted:
        split = keys.split(key)
        block = block_of(split[0]) if split is not None else None
        by_block.setdefault(block or "", set()).add(key)
    unexpected = _stream(model, reader, keys, owner_of, context, progress, skip, names=by_block.pop("", set()))
    calibrating = {unit.name: unit for unit in owner_of.values() if unit.context.calibrating}
    inputs = calibrate.capture_inputs(model, model.get_submodule(blocks[0]), sequences)
    for number, block_name in enumerate(blocks):
        block_keys = by_block.get(block_name, set())
        full_precision = frozenset(
            name for unit in calibrating.values() for name in unit.context.block_modules(block_name)
        )
        unexpected += _stream(
            model, reader, keys, owner_of, context, progress, skip, names=block_keys, full_precision=full_precision
        )
        block = model.get_submodule(block_name)
        inputs = calibrate.moved(inputs, context.device_for(block_name))
        for unit in calibrating.values():
            modules = unit.context.block_modules(block_name)
            if not modules:
                continue
            before = {name: model.get_submodule(name) for name in modules}
            # Without gradients: the full-precision weights are trainable parameters, and statistics computed from
            # them would otherwise keep every intermediate alive in their autograd graph, stored with the layer.
            with torch.no_grad():
                _run(
                    "calibrate_block", unit.registered, block_name,
                    config=unit.config, context=unit.context, model=model,
                    block_name=block_name, block=block, inputs=inputs,
                )  # fmt: skip
            # A module its config's settings do not fit may stay in full precision (QuantConfig.shape_fallback).
            kept = [
                name
                for name, module in before.items()
                if model.get_submodule(name) is module and name not in unit.context.fallbacks
            ]
            if kept:
                wrong = TypeError("left the module in full precision; replace each of context.block_modules(...)")
                raise PluginError(unit.name, "calibrate_block", kept[0], wrong)
            for name in modules:  # the key mapper's references would otherwise keep the full-precision modules alive
                keys.modules[name] = model.get_submodule(name)
            del before
        for key in block_keys:
            split = keys.split(key)
            if split is not None and split[0] in full_precision:
                reader.release(key)  # the full-precision weight is gone from the model; drop its pages too
        if number + 1 < len(blocks):
            inputs = inputs.advanced(inputs.run(block))
        release_heap()  # the block's full-precision temporaries go back to the system before the next is read
        logger.info("calibrated %s (%d of %d)", block_name, number + 1, len(blocks))
    return unexpected


def _views_storage_of(values: list[Any], tensor: torch.Tensor) -> bool:
    """Whether any of ``values`` is ``tensor`` or a view of its memory (so it was kept as stored)."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(pointer in _storage_pointers(v) for v in values)


def _storage_pointers(value: Any) -> list[int]:
    if hasattr(type(value), "__tensor_flatten__"):  # a wrapper subclass (torchao's): its data is in inner tensors
        return [p for name in value.__tensor_flatten__()[0] for p in _storage_pointers(getattr(value, name))]
    return [value.untyped_storage().data_ptr()] if isinstance(value, torch.Tensor) else []


class _HeapRelease:
    """Hands the heap that conversions freed back to the system every so often during a load (glibc only).

    A backend's conversion allocates full-precision temporaries several times the tensor's size; freed, they stay
    in malloc's heap, and over a load that heap grows to hundreds of MB of free but resident memory, more than the
    quantized model itself. :func:`qcore.memory.release_heap` returns it, at about a millisecond a call.
    """

    EVERY_NBYTES = 64 * 2**20

    def __init__(self) -> None:
        self.pending = 0

    def after(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.EVERY_NBYTES:
            release_heap()
            self.pending = 0


_FLOATING = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


def _check_headers(model, keys, reader, units, pre_quantized: bool, allow_unexpected: bool) -> set[str]:
    no_place = _check_fit(model, keys, reader, {name for unit in units for name in unit.context.modules}, pre_quantized)
    _report_unexpected(sorted(no_place), allow_unexpected, reader)
    return no_place


def _check_fit(
    model: nn.Module, keys: _KeyMapper, reader: CheckpointSource, owned: set[str], pre_quantized: bool
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
        if current.is_floating_point() != (info.dtype in _FLOATING or not info.is_plain):
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
    if type(value) in (torch.Tensor, nn.Parameter) and not value.is_contiguous():
        # A loaded model is laid out as its reload will be: the saver writes contiguous tensors and the reload
        # reads them so. A backend's converted tensor may be a strided view (GPT-2's Conv1D weight quantized through
        # its transpose), and CPU bf16 matmuls round a transposed operand differently on some instruction sets, so
        # keeping the view would make the reloaded model compute other logits than the one that was saved. Tensor
        # subclasses define their own layout and are left as they are.
        contiguous = value.data.contiguous()
        value = nn.Parameter(contiguous, value.requires_grad) if isinstance(value, nn.Parameter) else contiguous
    if name in owner._parameters and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    if name in owner._buffers and not isinstance(value, nn.Parameter):
        owner._buffers[name] = value
    else:
        # nn.Module.__setattr__ registers a Parameter even where the module held a plain attribute of that name
        # (HQQLinear keeps ``bias = None`` as one), and drops the stale entry.
        setattr(owner, name, value)


def _report_unexpected(unexpected: list[str], allow: bool, reader: CheckpointSource) -> None:
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


def _check_missing(model: nn.Module, reader: CheckpointSource) -> None:
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
    model,
    spec: Recipe | None,
    applied: Mapping[str, QuantConfig],
    candidates: list[str],
    context: LoadContext,
    taken: Mapping[str, QuantConfig] | None = None,
) -> None:
    """Record what was applied, where transformers and the ecosystem (PEFT, Trainer) look for it.

    ``taken`` (modules backends took beyond their assignment) join ``model.qcore_applied``, so dequantize and
    convert reach them, but not the saved config: a reload assigns modules from the config, and the backend takes
    the same modules again.
    """
    model.qcore_kernels = context.kernels
    model.qcore_fallbacks = context.fallbacks
    # A fallback that kept a module in full precision leaves it out of what was applied, so the saved config's skip
    # list names it and every reader (transformers, vLLM) loads its plain weight.
    applied = {name: config for name, config in applied.items() if not _kept_plain(model, name, context.fallbacks)}
    if context.fallbacks:
        name, what = next(iter(context.fallbacks.items()))
        logger.warning(
            "%d module(s) did not fit their quantization settings and took a fallback, e.g. %s: %s "
            "(model.qcore_fallbacks lists them)", len(context.fallbacks), name, what,
        )  # fmt: skip
    if spec is None or not applied:
        return
    from qcore._hf import QcoreQuantizer

    plain = _as_plain_config(spec, model, applied, candidates)
    quant_dict = plain.to_dict() if plain is not None else spec.to_dict(applied)
    model.qcore_applied = {**applied, **(taken or {})}
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            module.config.quantization_config = quant_dict
            module.config._is_quantized = True
    model.hf_quantizer = QcoreQuantizer(quant_dict, plain)
    model.is_quantized = True
    model.quantization_method = model.hf_quantizer.quantization_config.quant_method


def _kept_plain(model: nn.Module, name: str, fallbacks: Mapping[str, str]) -> bool:
    """Whether ``name`` took a fallback that left it the skeleton's own ``nn.Linear``/``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return name in fallbacks and type(model.get_submodule(name)) in (nn.Linear, Conv1D)


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

        try:
            model.generation_config = GenerationConfig.from_pretrained(source)
        except (OSError, ValueError) as error:  # transformers reports an unreadable or invalid file as either
            raise CheckpointError(
                f"cannot be read ({type(error).__name__}: {error}); check its permissions, fix it or delete it",
                file=str(source / "generation_config.json"),
            ) from None


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
