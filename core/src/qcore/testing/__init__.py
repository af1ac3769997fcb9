"""``qcore.testing``: the conformance suite every backend runs, in about ten lines of its own.

A backend package subclasses :class:`BackendConformance`, names its distribution, method and a config, and
inherits the standard tests::

    from qcore.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        distribution = "qcore-mybackend"
        library = "mylib"                      # the import its validate() needs
        config = {"quant_method": "mymethod", "bits": 4}
        skip_field = "modules_to_not_convert"  # the config field holding a skip list
        tolerance = 0.1                        # max |logits - full precision| / max |full precision|

The tests cover registration (entry point, hook signatures), the config round trip, on-the-fly quantization of tiny
models of several architectures through all six phases, accuracy, save/reload without re-quantizing, no pickle,
skip lists and the missing-library error. Each test's docstring says how to fix a failure. A subclass may not
override or delete a standard test silently: list it in ``expected_failures`` with the reason, and it runs as
``xfail``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from qcore.testing.models import ARCHITECTURES, build, logits
from qcore.timing import PhaseTimer

__all__ = ["BackendConformance", "ARCHITECTURES", "build", "logits"]


class _PhaseRecorder(PhaseTimer):
    """The phase timer, also noting whether each call saw a pre-quantized checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.pre_quantized: set[bool] = set()

    def observe(self, phase: str, context: Any) -> None:
        self.pre_quantized.add(context.pre_quantized)

    @property
    def phases(self) -> list[str]:
        """The phases that ran, in the order they first ran."""
        return list(self.calls)


@contextlib.contextmanager
def _recording() -> Iterator[_PhaseRecorder]:
    import qcore

    recorder = _PhaseRecorder()
    qcore.register_plugin(recorder, "qcore-conformance-recorder")
    try:
        yield recorder
    finally:
        qcore.unregister_plugin("qcore-conformance-recorder")


def _copy(function: Any) -> Any:
    import functools
    import types

    copy = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy = functools.update_wrapper(copy, function)
    copy.__dict__.pop("pytestmark", None)  # update_wrapper copied the base function's marks too
    return copy


class BackendConformance:
    """The standard tests for a qcore backend. Subclass it in a ``test_*.py`` file and set the attributes below."""

    #: The backend's distribution name, e.g. ``"qcore-bnb"`` (must be installed, with its entry point).
    distribution: ClassVar[str]
    #: A config dict (``{"quant_method": ..., ...}``) that quantizes.
    config: ClassVar[dict[str, Any]]
    #: The top-level module of the backend's library, whose absence ``validate`` must report.
    library: ClassVar[str | None] = None
    #: The config field holding a user skip list; by default the config class's own ``skip_field``.
    skip_field: ClassVar[str | None] = None
    #: Largest accepted ``max |logits - fp| / max |fp|`` against the full-precision model.
    tolerance: ClassVar[float] = 0.25
    #: Architectures (keys of ``qcore.testing.ARCHITECTURES``) quantized end to end; at least two.
    architectures: ClassVar[tuple[str, ...]] = ("llama", "opt", "gpt2")
    #: dtype the models are loaded in (a name: ``"bfloat16"``, ``"float16"``, ``"float32"``).
    dtype: ClassVar[str] = "bfloat16"
    #: Standard tests this backend is known to fail: name -> reason. They run as strict xfail.
    expected_failures: ClassVar[dict[str, str]] = {}

    _STANDARD: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A guard: a standard test replaced or deleted (set to None) by a subclass would pass silently.
        for name in BackendConformance._STANDARD:
            if cls.__dict__.get(name, BackendConformance.__dict__[name]) is not BackendConformance.__dict__[name]:
                if name not in cls.expected_failures:
                    raise TypeError(
                        f"{cls.__name__} overrides or deletes the standard test {name}; do not. If the backend "
                        f"cannot pass it, list it in expected_failures with the reason instead."
                    )
        unknown = set(cls.expected_failures) - BackendConformance._STANDARD
        if unknown:
            raise TypeError(f"{cls.__name__}.expected_failures names tests that do not exist: {sorted(unknown)}")
        for name, reason in cls.expected_failures.items():
            # A fresh function per subclass: marking the shared base function would leak the xfail to every backend.
            setattr(cls, name, pytest.mark.xfail(reason=reason, strict=True)(_copy(BackendConformance.__dict__[name])))

    # -- fixtures ----------------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def checkpoints(self, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        root = tmp_path_factory.mktemp("conformance")
        return {arch: build(arch, root / arch) for arch in {*self.architectures, "llama"}}

    @pytest.fixture(scope="class")
    def quantized(self, checkpoints: dict[str, Path]) -> dict[str, Any]:
        import qcore

        models = {}
        for arch in self.architectures:
            with _recording() as recorder:
                models[arch] = (
                    qcore.from_pretrained(checkpoints[arch], dict(self.config), dtype=self._dtype()),
                    recorder,
                )
        return models

    def _dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def _plugin_name(self) -> str:
        from qcore import plugins

        for registered in plugins._get().registered.values():
            if registered.distribution == self.distribution:
                return registered.plugin_name
        pytest.fail(f"{self.distribution} is not registered; is it installed (pip install -e .) with its entry point?")

    # -- registration --------------------------------------------------------------------------------------

    def test_entry_point_resolves_and_registers(self) -> None:
        """The distribution declares an entry point in group ``qcore`` that loads and registers without errors.

        Fix: add ``[project.entry-points.qcore] <name> = "<package>.plugin"`` to pyproject.toml, reinstall, and
        make sure the module imports without torch or the backend library (import those inside hooks). A
        ``PluginValidationError`` means a hook's arguments are not a subset of the spec's: compare with
        ``qcore/hookspecs.py``.
        """
        import pluggy

        from qcore import hookspecs

        points = [
            ep for ep in importlib.metadata.entry_points(group="qcore") if ep.dist and ep.dist.name == self.distribution
        ]
        assert points, f"no entry point in group 'qcore' belongs to {self.distribution}"
        manager = pluggy.PluginManager("qcore")
        manager.add_hookspecs(hookspecs)
        manager.register(points[0].load(), name=points[0].name)
        backends = [b for b in manager.hook.register_backend() if b is not None]
        assert len(backends) == 1, "register_backend must return exactly one qcore.Backend"
        assert self.config["quant_method"] in backends[0].configs

    def test_implements_only_hooks_in_the_spec(self) -> None:
        """Every hookimpl of the plugin matches a hook in the spec (no typos such as ``load_weights``).

        Fix: rename the function to one of the six phases or ``register_backend``; qcore would never call it.
        """
        import pluggy

        from qcore import hookspecs

        point = next(
            ep for ep in importlib.metadata.entry_points(group="qcore") if ep.dist and ep.dist.name == self.distribution
        )
        manager = pluggy.PluginManager("qcore")
        manager.add_hookspecs(hookspecs)
        manager.register(point.load())
        manager.check_pending()

    def test_config_round_trips(self) -> None:
        """``from_dict(d).to_dict()`` parses back to the same config, and keeps ``quant_method``.

        Fix: make ``to_dict`` write every field ``from_dict`` reads (in the form transformers writes).
        """
        from qcore import QuantConfig

        config = QuantConfig.from_dict(dict(self.config))
        data = config.to_dict()
        assert data["quant_method"] == self.config["quant_method"]
        assert QuantConfig.from_dict(data) == config

    # -- quantizing --------------------------------------------------------------------------------------

    def test_quantizes_through_all_six_phases(self, quantized: dict[str, Any]) -> None:
        """Each architecture loads through validate ... optimize_runtime and the model reports itself quantized.

        Fix: a missing phase name in the assertion means the backend does not implement it or raised silently;
        ``is_quantized`` false means no module was assigned to the backend (check ``preprocess_model`` replaces
        ``context.modules``).
        """
        from qcore import hookspecs

        for arch, (model, recorder) in quantized.items():
            assert recorder.phases == list(hookspecs.PHASES), f"{arch}: phases seen {recorder.phases}"
            assert recorder.pre_quantized == {False}
            assert model.is_quantized

    def test_outputs_finite_and_close_to_full_precision(
        self, quantized: dict[str, Any], checkpoints: dict[str, Path]
    ) -> None:
        """Logits are finite and within ``tolerance`` (relative to the largest logit) of the full-precision model.

        Fix: check the dequantization scale, the compute dtype and that biases are kept; if the method is coarse by
        design, raise ``tolerance`` and say why in the test file.
        """
        import torch

        import qcore

        for arch, (model, _) in quantized.items():
            reference = logits(qcore.from_pretrained(checkpoints[arch], dtype=self._dtype())).float()
            result = logits(model).float()
            assert torch.isfinite(result).all(), f"{arch}: non-finite logits"
            error = (result - reference).abs().max() / reference.abs().max()
            assert error <= self.tolerance, f"{arch}: relative error {error:.4f} > tolerance {self.tolerance}"

    def test_save_then_reload_is_identical_without_requantizing(
        self, quantized: dict[str, Any], tmp_path: Path
    ) -> None:
        """A saved model reloads (no config given) as pre-quantized, with bit-identical logits.

        Fix: the quantized module's ``state_dict()`` must hold every tensor needed to rebuild it, and
        ``load_weight`` must rebuild it when ``context.pre_quantized`` is true (``context.gather`` collects a
        module's tensors) instead of quantizing again.
        """
        import torch

        import qcore

        for arch, (model, _) in quantized.items():
            qcore.save_pretrained(model, tmp_path / arch)
            with _recording() as recorder:
                reloaded = qcore.from_pretrained(tmp_path / arch)
            assert recorder.pre_quantized == {True}
            assert torch.equal(logits(reloaded), logits(model)), f"{arch}: reloaded logits differ"

    def test_saved_files_contain_no_pickle(self, quantized: dict[str, Any], tmp_path: Path) -> None:
        """The saved checkpoint holds only safetensors and JSON files.

        Fix: keep every piece of metadata in tensors of the module's ``state_dict()`` (encode strings and ints as
        uint8/int tensors); never ``torch.save``.
        """
        import qcore

        model = next(iter(quantized.values()))[0]
        qcore.save_pretrained(model, tmp_path / "out")
        for path in (tmp_path / "out").iterdir():
            assert path.suffix in (".safetensors", ".json"), f"unexpected file {path.name}"
            assert not path.read_bytes()[:2].startswith(b"\x80"), f"{path.name} looks like a pickle"

    def test_skip_list_is_honoured(self, checkpoints: dict[str, Path]) -> None:
        """Modules named in the config's skip list stay plain ``torch.nn.Linear``; the others are quantized.

        Fix: set ``skip_field`` on the config class to the field holding the skip list (the default
        ``skip_modules()`` then returns it), or override ``skip_modules()``.
        """
        import torch

        import qcore

        skip_field = self.skip_field or type(qcore.QuantConfig.from_dict(dict(self.config))).skip_field
        if skip_field is None:
            pytest.fail("set skip_field on the config class (or the test class) to the field holding the skip list")
        model = qcore.from_pretrained(
            checkpoints["llama"], {**self.config, skip_field: ["q_proj", "lm_head"]}, dtype=self._dtype()
        )
        layer = model.model.layers[0]
        assert type(layer.self_attn.q_proj) is torch.nn.Linear
        assert type(layer.self_attn.k_proj) is not torch.nn.Linear

    def test_validate_reports_missing_library(
        self, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the backend's library not importable, ``validate`` raises ``BackendUnavailable`` naming pip.

        Fix: import the library inside ``validate`` and turn the ``ImportError`` into
        ``qcore.BackendUnavailable("... pip install <lib>")``.
        """
        import qcore
        from qcore import plugins
        from qcore.context import LoadContext

        if self.library is None:
            pytest.fail("set library to the module validate() imports")
        for name in [m for m in sys.modules if m == self.library or m.startswith(self.library + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, self.library, None)  # makes `import library` raise ImportError
        from transformers import AutoConfig

        config = qcore.QuantConfig.from_dict(dict(self.config))
        context = LoadContext(
            checkpoints["llama"],
            AutoConfig.from_pretrained(checkpoints["llama"]),
            False,
            self._dtype(),
            {"": "cpu"},
            None,
        )  # type: ignore[arg-type]
        with pytest.raises(qcore.BackendUnavailable, match="pip install"):
            plugins.phase_caller("validate", self._plugin_name())(config=config, context=context)


BackendConformance._STANDARD = frozenset(name for name in vars(BackendConformance) if name.startswith("test_"))
