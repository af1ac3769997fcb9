"""The qcore hook specification: one registration hook and the six loading phases, in the order they run.

A backend is a pluggy plugin (usually a module named by an entry point in the ``qcore`` group) that implements
:func:`register_backend` and some of the six phases. The loader (``qcore/loading.py``) runs the phases
top to bottom for every backend the model uses::

    validate -> update_device_map -> preprocess_model -> load_weight (once per tensor) -> postprocess -> optimize_runtime

Only the backends the model actually uses run their phase hooks, each with only its own modules: a model whose
recipe mixes methods calls every phase once per (backend, config) pair. Plugins that are not backends (a timing or
logging plugin, say) may observe every call by implementing a phase as a ``wrapper=True`` hookimpl.

Every phase receives the :class:`~qcore.QuantConfig` being applied and a :class:`~qcore.LoadContext` that describes
the load (source checkpoint, dtype, device map, checkpoint keys, whether the checkpoint is pre-quantized).
An exception raised by a phase that is not a :class:`~qcore.QcoreError` is wrapped in
:class:`~qcore.PluginError` naming the plugin, the phase and the module, and no model is returned.

Types are imported for checking only, so that importing this module (and discovering plugins) costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from qcore.backend import Backend
    from qcore.config import QuantConfig
    from qcore.context import LoadContext

hookspec = pluggy.HookspecMarker("qcore")


# -------------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------------


@hookspec
def register_backend() -> Backend | None:
    """Declare the backend this plugin provides: its name, the ``quant_method`` values it serves with their
    config classes, its presets and what it needs to run.

    Called once, when plugins are discovered; the result is cached for the life of the process.

    :returns: a :class:`~qcore.Backend`, or ``None`` for a plugin that only observes (not a backend).

    Implementing in a backend: required. Must be cheap and must not import torch or the backend's own library:
    ``qcore backends`` and :func:`qcore.backends` call it to list what is installed, and they promise not to import
    anything heavy. Put availability checks that need the library in ``Backend.check`` using
    ``importlib.util.find_spec``/``importlib.metadata`` only, and keep config classes free of torch imports.
    """


# -------------------------------------------------------------------------------------------------
# Phase 1: validate (fail fast)
# -------------------------------------------------------------------------------------------------


@hookspec
def validate(config: QuantConfig, context: LoadContext) -> None:
    """Check that this config can be applied here, before any weight file is read.

    Runs first, once per (backend, config) used by the model, as soon as config.json has been read: before any
    weight file is located, read or (for a hub id) downloaded.

    :param config: the config this backend will apply, already merged with the user's loading attributes.
    :param context: the load: ``context.model_config``, ``context.dtype`` and ``context.pre_quantized`` are set;
        ``context.checkpoint`` is ``None`` and ``context.modules`` empty, because no weight has been looked at yet.
    :returns: nothing; refuse by raising.

    Implementing in a backend: required. Import the backend's library here (not at module import) and raise
    :class:`~qcore.BackendUnavailable` naming the pip command when it is missing or too old, or the hardware need
    when the device cannot run it; raise :class:`~qcore.ConfigError` naming the field for a setting this backend
    cannot serve. Must not read weights, allocate on the GPU or mutate ``config``.
    """


# -------------------------------------------------------------------------------------------------
# Phase 2: update_device_map (device placement)
# -------------------------------------------------------------------------------------------------


@hookspec
def update_device_map(config: QuantConfig, context: LoadContext, device_map: dict[str, Any]) -> dict[str, Any] | None:
    """Adjust where modules go before the model skeleton is filled.

    Runs once per (backend, config), in the order backends appear in the recipe; each sees the map the previous one
    returned. The map is in accelerate's form: module-name prefix -> ``"cpu"``, ``"disk"``, ``"cuda:0"`` or an
    int device index; ``""`` is the whole model.

    :param config: the config this backend applies.
    :param context: the load; ``context.modules`` lists the modules this backend owns.
    :param device_map: the current map (already resolved from ``"auto"``/``"balanced"`` by accelerate).
    :returns: a new map, or ``None`` to keep the current one.

    Implementing in a backend: optional. Return a new dict rather than mutating the argument. Raise
    :class:`~qcore.ConfigError` naming the module and the device when a placement cannot be served (for example
    4-bit weights offloaded to disk). Must not touch the GPU or read weights.
    """


# -------------------------------------------------------------------------------------------------
# Phase 3: preprocess_model (prepare the skeleton)
# -------------------------------------------------------------------------------------------------


@hookspec
def preprocess_model(config: QuantConfig, context: LoadContext, model: PreTrainedModel) -> None:
    """Replace the modules this backend owns with their quantized counterparts, on the meta device.

    Runs once per (backend, config) after the device map is final and before any tensor is read. The model is a
    transformers model whose parameters are all on the meta device.

    :param config: the config this backend applies.
    :param context: the load; ``context.modules`` lists the module names (``nn.Linear`` or transformers ``Conv1D``)
        this backend owns. The core has already removed skipped modules (``config.skip_modules()``, the output
        embeddings and tied weights by default) and the modules other backends own.
    :param model: the skeleton, mutated in place.
    :returns: nothing.

    Implementing in a backend: required. Touch only ``context.modules``; create new modules on the meta device (or
    defer their creation to :func:`load_weight`); never allocate real memory for weights here.
    """


# -------------------------------------------------------------------------------------------------
# Phase 4: load_weight (per-tensor conversion)
# -------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def load_weight(
    config: QuantConfig,
    context: LoadContext,
    model: PreTrainedModel,
    module_name: str,
    tensor_name: str,
    tensor: torch.Tensor,
) -> dict[str, Any] | None:
    """Convert one checkpoint tensor of a module this backend owns into what the module should hold.

    Runs once per checkpoint tensor that belongs to one of ``context.modules``, in checkpoint order, as the tensors
    stream in shard by shard. Tensors of modules no backend owns are placed by the core without calling this hook.
    Stops at first non-None result.

    :param config: the config this backend applies.
    :param context: the load; ``context.pre_quantized`` says whether ``tensor`` is already quantized,
        ``context.device_for(module_name)`` where the result must live, and ``context.gather(...)`` collects a
        module's several checkpoint tensors (e.g. ``weight`` plus its quantization statistics) until all have arrived.
    :param model: the model being filled.
    :param module_name: the owning module's name in the model, e.g. ``"model.layers.0.self_attn.q_proj"``.
    :param tensor_name: the tensor's name relative to that module, e.g. ``"weight"``, ``"bias"``, ``"weight.absmax"``.
    :param tensor: the tensor as stored (CPU, checkpoint dtype): a copy-on-write view of the checkpoint file.
        Returned as is, it stays a view and is never copied; converted, its pages are dropped once this hook
        returns. Writing into it never reaches the file.
    :returns: ``{attribute_name: value}`` to set on the module (parameters or buffers, already on their device; an
        empty dict when the tensor was consumed but nothing is ready yet, e.g. a statistic waiting for its weight), or
        ``None`` to let the core place the tensor as it is: cast to the dtype of the module's slot in the skeleton
        (``context.dtype``, or float32 for modules the model keeps in float32) and moved to its device.

    Implementing in a backend: required for a backend that quantizes. Do not keep references to full-precision
    tensors beyond the call (peak memory depends on it); do the quantization on the target device when it is a GPU.
    """


# -------------------------------------------------------------------------------------------------
# Phase 5: postprocess (finish)
# -------------------------------------------------------------------------------------------------


@hookspec
def postprocess(config: QuantConfig, context: LoadContext, model: PreTrainedModel) -> None:
    """Finish the modules this backend owns after every tensor has been loaded.

    Runs once per (backend, config) after all shards have been read and tied weights re-tied, before the core checks
    that no parameter is left on the meta device.

    :param config: the config this backend applies.
    :param context: the load; ``context.modules`` lists this backend's modules.
    :param model: the loaded model, mutated in place.
    :returns: nothing.

    Implementing in a backend: optional. Set the attributes the ecosystem looks for (e.g. ``is_loaded_in_4bit``),
    complete anything deferred by :func:`load_weight`, and raise :class:`~qcore.CheckpointError` for a module whose
    tensors never all arrived. Must not re-quantize or re-read weights.
    """


# -------------------------------------------------------------------------------------------------
# Phase 6: optimize_runtime (kernels)
# -------------------------------------------------------------------------------------------------


@hookspec
def optimize_runtime(config: QuantConfig, context: LoadContext, model: PreTrainedModel) -> None:
    """Select the fastest kernels available for the device and dtype in use.

    Runs last, once per (backend, config), on the finished model; the load then returns it.

    :param config: the config this backend applies.
    :param context: the load; ``context.modules`` lists this backend's modules.
    :param model: the finished model, mutated in place.
    :returns: nothing. Record the choice with ``context.report_kernel(name)`` so ``model.qcore_kernels`` shows it.

    Implementing in a backend: optional. May touch the GPU (compile kernels, repack weights). Must not change the
    numerics beyond what the chosen kernel's own tests allow, and must leave the model saveable by
    :func:`qcore.save_pretrained` in the same checkpoint format.
    """


PHASES = ("validate", "update_device_map", "preprocess_model", "load_weight", "postprocess", "optimize_runtime")
