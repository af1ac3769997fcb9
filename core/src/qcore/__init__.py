"""qcore: load Hugging Face transformers models with their weights quantized while loading, by any installed backend.

Importing qcore imports neither torch nor any backend library: :func:`from_pretrained` and :func:`save_pretrained`
import them when called, and :func:`backends` lists what is installed without importing them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from qcore.backend import Backend, BackendInfo, Preset
from qcore.config import QuantConfig
from qcore.context import LoadContext
from qcore.errors import BackendUnavailable, CheckpointError, ConfigError, PluginError, QcoreError
from qcore.plugins import backends, register_plugin, reset_plugins, unregister_plugin

if TYPE_CHECKING:
    from qcore.convert import dequantize
    from qcore.loading import from_pretrained
    from qcore.recipe import Recipe
    from qcore.saving import save_pretrained

__all__ = [
    "hookimpl",
    "from_pretrained",
    "save_pretrained",
    "dequantize",
    "backends",
    "register_plugin",
    "unregister_plugin",
    "reset_plugins",
    "QuantConfig",
    "Recipe",
    "Backend",
    "BackendInfo",
    "Preset",
    "LoadContext",
    "QcoreError",
    "ConfigError",
    "CheckpointError",
    "BackendUnavailable",
    "PluginError",
]

#: Marker for hook implementations: ``@qcore.hookimpl def load_weight(...)``.
hookimpl = pluggy.HookimplMarker("qcore")

_LAZY = {
    "from_pretrained": "qcore.loading",
    "save_pretrained": "qcore.saving",
    "dequantize": "qcore.convert",
    "Recipe": "qcore.recipe",
}


def __getattr__(name: str) -> Any:
    # The loader and saver import torch and transformers; load them on first use so `import qcore` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcore' has no attribute {name!r}")
