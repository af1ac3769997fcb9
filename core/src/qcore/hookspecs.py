"""The qcore hook specification: one registration hook, the six loading phases in the order they run, and three
extension hooks beside them (calibration, stored metadata, dequantization).

A backend is a pluggy plugin (usually a module named by an entry point in the ``qcore`` group) that implements
:func:`register_backend` and some of the six phases. The loader (``qcore/loading.py``) runs the phases
top to bottom for every backend the model uses::

    validate -> update_device_map -> preprocess_model -> load_weight (once per tensor) -> postprocess -> optimize_runtime

Three hooks extend that pipeline without adding phases: :func:`calibrate_block` replaces ``load_weight`` for a
config that needs calibration data (GPTQ, AWQ), one decoder block at a time; :func:`save_metadata` adds entries to
the safetensors ``__metadata__`` header when a model is saved; :func:`dequantize_module` is the inverse of
``load_weight``, used by :func:`qcore.dequantize` and ``qcore convert``. A container format other than safetensors
is not a hook but a field of the :class:`~qcore.Backend` a plugin registers (``readers``, a file suffix -> a
:class:`~qcore.checkpoint.CheckpointSource` factory).

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
    from torch import nn
    from transformers import PreTrainedModel

    from qcore.backend import Backend
    from qcore.calibration import BlockInputs
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
        ``context.device_map`` is the map the caller *requested*, holding only the devices it names: a dict as given,
        ``{"": device}`` for a device string or index, and ``{}`` for ``"auto"``, ``"balanced"``,
        ``"balanced_low_0"``, ``"sequential"`` and no map at all, which name no device until they are resolved.
        The resolved map arrives in :func:`update_device_map`.
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
    :param device_map: the *resolved* map: a strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
        ``"sequential"``) already turned into module prefixes by :mod:`qcore.placement` from each module's
        quantized size, a device string into ``{"": device}``, a dict as given; ``context.device_map`` is the same.
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

    A backend that keeps a module the core leaves in full precision quantized (a tied input embedding and its output
    layer, held once in the checkpoint's quantized form) calls ``context.take(name)`` for it here, before replacing
    it: the module's checkpoint tensors then reach :func:`load_weight`, :func:`dequantize_module` gives it back in
    full precision, and the core does not tie it (the backend ties what it took, in :func:`postprocess`).
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
# Phase 4, with calibration: calibrate_block (per decoder block)
# -------------------------------------------------------------------------------------------------


@hookspec
def calibrate_block(
    config: QuantConfig,
    context: LoadContext,
    model: PreTrainedModel,
    block_name: str,
    block: nn.Module,
    inputs: BlockInputs,
) -> None:
    """Quantize the modules this backend owns in one decoder block, from the block's inputs on calibration data.

    Runs instead of :func:`load_weight` for the modules of a config whose ``needs_calibration`` is true, when the
    checkpoint is not pre-quantized. The core then streams the model one decoder block at a time, in model order:
    every tensor outside the decoder blocks first (embeddings, final norm, head), then, for each block, all of its
    tensors, placed in full precision on the block's device. Once a block is complete this hook runs with the
    calibration batch's inputs to it; afterwards the core runs the (now quantized) block on those inputs to make the
    next block's inputs, and frees the full-precision tensors. Peak memory is the quantized model, one block in full
    precision and the calibration activations. Modules the backend owns outside every decoder block (a recipe that
    quantizes ``lm_head``) still reach :func:`load_weight`.

    :param config: the config this backend applies.
    :param context: the load; ``context.modules`` lists every module this backend owns in the model, and
        ``context.block_modules(block_name)`` those inside this block.
    :param model: the model being filled; blocks after this one are still on the meta device.
    :param block_name: the block's name in the model, e.g. ``"model.layers.3"``.
    :param block: the block, every tensor real: this backend's modules are the skeleton's own ``nn.Linear`` (or
        transformers ``Conv1D``) holding full-precision weights; modules other backends own are already quantized.
    :param inputs: the calibration batch's inputs to the block, as the model passes them: ``inputs.args[i]`` and
        ``inputs.kwargs[i]`` for sequence ``i`` (hidden states first, then the attention mask, position embeddings
        and so on), and ``inputs.run(block)`` to run any module built on them (a layer's input activations are
        collected with forward hooks on its Linears while ``run`` executes).
    :returns: nothing; the block is mutated in place.

    Implementing in a backend: required for a backend whose config sets ``needs_calibration``. Replace every module
    of ``context.block_modules(block_name)`` with its quantized counterpart (``block.set_submodule``), on the
    block's device, and keep no reference to the full-precision weights: the core checks that each was replaced and
    frees them. In :func:`preprocess_model`, leave such modules as they are when ``context.calibrating`` is true
    (the core places their full-precision weights, which needs the original modules). May run the block as often
    as the algorithm needs (GPTQ runs it once per sub-layer group), and may touch the GPU. Runs under
    ``torch.no_grad()``.
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


# -------------------------------------------------------------------------------------------------
# After loading: saving and dequantizing
# -------------------------------------------------------------------------------------------------


@hookspec
def save_metadata(config: QuantConfig, model: PreTrainedModel, modules: tuple[str, ...]) -> dict[str, str] | None:
    """Entries this backend stores in the safetensors ``__metadata__`` header when the model is saved.

    Runs in :func:`qcore.save_pretrained`, once per (backend, config) the model was loaded with, before any file is
    written. The entries of every backend are merged (two backends giving one key different values is an error) and
    written, with ``"format": "pt"``, into the header of every shard, as transformers writes its quantizers'
    metadata; a load merges the headers of all shards back into ``context.checkpoint.metadata``.

    :param config: the config this backend applied.
    :param model: the model being saved.
    :param modules: the names of the modules this backend owns, in model order.
    :returns: ``{key: value}`` with string keys and values (JSON text for structured values), or ``None`` for none.

    Implementing in a backend: optional; for formats whose tensors need a description the tensors cannot carry
    (torchao writes one JSON entry per tensor subclass and a ``tensor_names`` list). Must not mutate the model. Read
    the entries back in :func:`load_weight` from ``context.checkpoint.metadata`` and validate them there, raising
    :class:`~qcore.CheckpointError` naming the key for a malformed one.
    """


@hookspec(firstresult=True)
def dequantize_module(
    config: QuantConfig, module_name: str, module: nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    """The full-precision tensors of one module this backend owns: the inverse of :func:`load_weight`.

    Used by :func:`qcore.dequantize` (which swaps each quantized module for a plain one in place) and by
    ``qcore convert`` (which streams these tensors into another backend, one module at a time, never holding the
    full-precision model). Stops at first non-None result.

    :param config: the config this backend applied to the module.
    :param module_name: the module's name in the model, e.g. ``"model.layers.0.mlp.down_proj"``.
    :param module: the quantized module, as :func:`load_weight` and :func:`postprocess` left it.
    :param dtype: the floating dtype the tensors must have.
    :returns: the tensors in the plain transformers naming and layout: ``{"weight": ...}`` shaped ``[out, in]`` for
        an ``nn.Linear``, ``[in, out]`` for a transformers ``Conv1D``, plus ``"bias"`` when the module has one; on
        the module's device. ``None`` when this backend does not own the module.

    Implementing in a backend: required for ``qcore convert`` and ``qcore.dequantize`` to accept the backend's
    models. Return new tensors and leave the module unchanged; the result must be the exact dequantized weight the
    module computes with (within the error bound the backend documents; the conformance suite checks it against a
    fresh quantization). May touch the GPU.
    """


PHASES = ("validate", "update_device_map", "preprocess_model", "load_weight", "postprocess", "optimize_runtime")
#: The hooks beside the phases, in the order they appear above.
EXTENSIONS = ("calibrate_block", "save_metadata", "dequantize_module")
