"""What a backend declares about itself (:class:`Backend`, :class:`Preset`) and what qcore reports about it
(:class:`BackendInfo`).

A plugin returns a :class:`Backend` from the ``register_backend`` hook; :func:`qcore.backends` turns each into a
:class:`BackendInfo` without importing torch or the backend's library.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from packaging.requirements import Requirement

from qcore.config import QuantConfig

if TYPE_CHECKING:
    from pathlib import Path

    from qcore.checkpoint import CheckpointSource

__all__ = ["Backend", "Preset", "BackendInfo"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A short name for a ready-made config, e.g. ``bnb-nf4``, with what a user needs to choose it."""

    name: str
    config: Mapping[str, Any]
    #: One line on the trade-off, shown by ``qcore recommend`` and ``qcore backends``.
    summary: str = ""
    #: Whether LoRA adapters can be trained on top of the quantized weights.
    trainable: bool = False
    #: Whether the method needs calibration data (none of the in-repo ones do).
    needs_calibration: bool = False
    #: Devices with a fast kernel for this preset, e.g. ``("cuda",)``; others run a slower fallback.
    fast_on: tuple[str, ...] = ()
    #: The backend's default choice, the one ``qcore demo`` shows (a backend's first preset when none says so).
    recommended: bool = False


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend, as its plugin declares it from ``register_backend``."""

    #: Short name, e.g. ``"bnb"``.
    name: str
    #: ``quant_method`` -> config class, for every method the backend serves.
    configs: Mapping[str, type[QuantConfig]]
    presets: tuple[Preset, ...] = ()
    #: Requirement strings the backend's library must satisfy, e.g. ``("bitsandbytes>=0.50.0",)``.
    requires: tuple[str, ...] = ()
    #: Extra availability check returning why the backend cannot run (with the fix), or ``None``. It must not
    #: import torch or the backend's library.
    check: Callable[[], str | None] | None = None
    #: Notes on an available backend, e.g. which kernel it will use here; same rules as ``check``.
    notes: Callable[[], str | None] | None = None
    #: Container formats this plugin reads: lower-case file suffix (``".gguf"``) -> a factory called with the path of
    #: such a weight file (already checked to lie inside its checkpoint directory) that returns a
    #: :class:`~qcore.checkpoint.CheckpointSource`. Declared at registration, so the factory must import its
    #: reader (and torch, and the container's library) only when called.
    readers: Mapping[str, Callable[[Path], CheckpointSource]] = dataclasses.field(default_factory=dict)

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here, with the fix; ``None`` when it can."""
        for text in self.requires:
            requirement = Requirement(text)
            try:
                installed = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                return f"{requirement.name} is not installed: pip install '{text}'"
            if installed not in requirement.specifier:
                return f"{requirement.name} {installed} is too old: pip install -U '{text}'"
        return self.check() if self.check else None


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`qcore.backends`: a discovered backend and whether it can run here."""

    name: str
    distribution: str
    version: str
    methods: tuple[str, ...]
    presets: tuple[str, ...]
    available: bool
    #: Why the backend is unavailable, with the fix; ``None`` for an available backend.
    reason: str | None
    #: Notes on an available backend, such as the kernel it will use here (``Backend.notes``); ``None`` otherwise.
    notes: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
