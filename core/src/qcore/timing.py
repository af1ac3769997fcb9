"""An observer plugin: the time spent in each of the six phases, summed over every backend and every load.

It is the example of a plugin that is not a backend: it declares none (no ``register_backend``) and implements each
phase as a ``wrapper=True`` hookimpl, which pluggy runs around whichever backend serves the call, so it sees all six
phases of every backend a model uses without changing what they return. Register one in code::

    from qcore.timing import PhaseTimer

    timer = PhaseTimer()
    qcore.register_plugin(timer)
    model = qcore.from_pretrained(path, {"quant_method": "hqq", "nbits": 4})
    timer.report()  # {"validate": 0.0002, "update_device_map": ..., "load_weight": 1.93, ...}
    qcore.unregister_plugin("PhaseTimer")

or, from an installed package, for every process: ``[project.entry-points.qcore] timing = "mypackage:timer"`` with
``timer = PhaseTimer()`` in ``mypackage``. A wrapper takes only the ``context`` argument (pluggy accepts any subset),
so it adds nothing to the per-tensor cost of ``load_weight`` but two clock reads. A subclass that wants to see each
call overrides :meth:`PhaseTimer.observe` (the conformance suite records phases that way).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

from qcore import hookimpl
from qcore.hookspecs import PHASES

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Accumulates wall-clock seconds and call counts per phase."""

    def __init__(self) -> None:
        #: phase -> seconds spent inside it, over every call so far.
        self.seconds: dict[str, float] = {}
        #: phase -> number of calls (``load_weight`` is called once per checkpoint tensor a backend owns).
        self.calls: dict[str, int] = {}

    def report(self) -> dict[str, float]:
        """Seconds per phase that ran, in the order the phases run."""
        return {phase: self.seconds[phase] for phase in PHASES if phase in self.seconds}

    def observe(self, phase: str, context: Any) -> None:
        """Called as each phase call starts, with its :class:`~qcore.LoadContext`; does nothing here."""

    def _timed(self, phase: str, context: Any) -> Generator[None, Any, Any]:
        self.observe(phase, context)
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            # Counted even when the backend raised: the time was spent all the same.
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            self.calls[phase] = self.calls.get(phase, 0) + 1

    @hookimpl(wrapper=True)
    def validate(self, context: Any) -> Generator[None, Any, Any]:
        return (yield from self._timed("validate", context))

    @hookimpl(wrapper=True)
    def update_device_map(self, context: Any) -> Generator[None, Any, Any]:
        return (yield from self._timed("update_device_map", context))

    @hookimpl(wrapper=True)
    def preprocess_model(self, context: Any) -> Generator[None, Any, Any]:
        return (yield from self._timed("preprocess_model", context))

    @hookimpl(wrapper=True)
    def load_weight(self, context: Any) -> Generator[None, Any, Any]:
        return (yield from self._timed("load_weight", context))

    @hookimpl(wrapper=True)
    def postprocess(self, context: Any) -> Generator[None, Any, Any]:
        return (yield from self._timed("postprocess", context))

    @hookimpl(wrapper=True)
    def optimize_runtime(self, context: Any) -> Generator[None, Any, Any]:
        return (yield from self._timed("optimize_runtime", context))
