"""The errors qcore raises on purpose.

Every one is a :class:`QcoreError`, so an application can catch them all in one place. Each message says
what went wrong, where (file, tensor, field, plugin, phase) and what to do about it.
"""

from __future__ import annotations

__all__ = ["QcoreError", "ConfigError", "CheckpointError", "BackendUnavailable", "PluginError", "InsufficientMemory"]


class QcoreError(Exception):
    """Base of every error qcore raises on purpose."""


class ConfigError(QcoreError, ValueError):
    """A quantization config (or config.json) is malformed, out of range or names an unknown method."""


class CheckpointError(QcoreError):
    """A checkpoint file is malformed, unsafe or does not fit the model; names the file and tensor."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        where = ", ".join(
            part for part in (f"file {file}" if file else "", f"tensor {tensor!r}" if tensor else "") if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.tensor = tensor


class BackendUnavailable(QcoreError, ImportError):
    """A backend cannot run here: its library is missing or too old, or the hardware it needs is absent."""


class PluginError(QcoreError):
    """A plugin raised while running one of the six phases."""

    def __init__(self, plugin: str, phase: str, where: str | None, cause: BaseException):
        at = f" on {where}" if where else ""
        super().__init__(
            f"plugin {plugin!r} failed in phase {phase!r}{at}: {type(cause).__name__}: {cause}. "
            f"No model was returned; report this to the plugin's authors, or load without it "
            f"(QCORE_LOAD_PLUGINS restricts which plugins load)."
        )
        self.plugin = plugin
        self.phase = phase
        self.where = where


class InsufficientMemory(QcoreError, MemoryError):
    """The load would not fit in the target devices' memory; raised before any weight is read.

    ``device``, ``needed`` and ``available`` (bytes) carry the numbers the message states, when the raiser knows them.
    """

    def __init__(
        self, message: str, *, device: str | None = None, needed: int | None = None, available: int | None = None
    ):
        super().__init__(message)
        self.device = device
        self.needed = needed
        self.available = available
