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
skip lists, the missing-library error, hostile or damaged checkpoints (no string in a checkpoint runs code, and every
damaged stored tensor of a quantized module is refused with a ``CheckpointError``; :mod:`qcore.testing.hostile` makes
those checkpoints), ``dequantize_module`` inverting the load within the documented bound, and, for a config that
needs calibration, the block-at-a-time memory bound of a calibrating load. Each test's docstring says how to fix a
failure. A subclass may not override or delete a standard test silently: list it in ``expected_failures`` with the
reason, and it runs as ``xfail``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from qcore import hookimpl
from qcore.testing import hostile
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
    #: Largest accepted ``max |logits(dequantized) - logits(quantized)| / max |logits(quantized)|``: how far the
    #: weights ``dequantize_module`` gives may be from what the quantized modules compute with (matmul rounding).
    dequantize_tolerance: ClassVar[float] = 0.05
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
                    qcore.from_pretrained(checkpoints[arch], dict(self.config), **self._quantizing()),
                    recorder,
                )
        return models

    def _dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def _quantizing(self) -> dict[str, Any]:
        """The arguments of a quantizing load: the dtype, and calibration token ids when the config needs them (the
        tiny models have no tokenizer for the built-in corpus)."""
        import torch

        import qcore

        arguments: dict[str, Any] = {"dtype": self._dtype()}
        if qcore.QuantConfig.from_dict(dict(self.config)).needs_calibration:
            arguments["calibration"] = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
        return arguments

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
        ``context.modules``). A config that needs calibration runs ``calibrate_block`` instead of ``load_weight``.
        """
        import qcore
        from qcore import hookspecs

        calibrating = qcore.QuantConfig.from_dict(dict(self.config)).needs_calibration
        expected = [phase for phase in hookspecs.PHASES if not (calibrating and phase == "load_weight")]
        for arch, (model, recorder) in quantized.items():
            assert recorder.phases == expected, f"{arch}: phases seen {recorder.phases}"
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

    # -- hostile and damaged checkpoints ---------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def saved(
        self, quantized: dict[str, Any], checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
    ) -> tuple[Path, str]:
        """A saved pre-quantized tiny Llama, and the quantized module whose tensors its last file stores last."""
        import qcore

        if "llama" in quantized:
            model = quantized["llama"][0]
        else:
            model = qcore.from_pretrained(checkpoints["llama"], dict(self.config), **self._quantizing())
        directory = tmp_path_factory.mktemp("saved") / "llama"
        qcore.save_pretrained(model, directory)
        modules = sorted(getattr(model, "qcore_applied", {}), key=len, reverse=True)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            pytest.fail(
                "qcore.save_pretrained wrote no safetensors file; the integrity tests damage one. If the backend saves "
                "another container, list them in expected_failures with the reason"
            )
        tensors, _ = hostile.stored_tensors(files[-1])
        owner = (next((m for m in modules if t.name.startswith(m + ".")), None) for t in reversed(tensors))
        module = next((m for m in owner if m is not None), None)
        if module is None:
            pytest.fail("the saved checkpoint's last safetensors file holds no tensor of a quantized module")
        return directory, module

    def test_strings_in_a_checkpoint_never_run_code(self, saved: tuple[Path, str], tmp_path: Path) -> None:
        """A checkpoint whose strings hold Python code loads with a ``CheckpointError``/``ConfigError`` or correctly,
        and the code never runs.

        One string at a time is replaced by an expression that would create a file if evaluated: each string of
        config.json, each safetensors metadata value, each tensor of a quantized module that encodes a string and each
        string inside such a tensor's JSON. Fix: decode every stored string yourself, from an allow-list of names
        (dtypes from a fixed table), before handing plain values to the library; never pass checkpoint data to a
        library function that calls ``eval``, ``exec``, ``pickle`` or ``importlib`` on it (hqq's
        ``decode_safetensor_type`` does), nor look a name from the file up with ``getattr`` on a module.
        """
        import json
        import shutil

        import torch

        import qcore

        directory, module = saved
        file = sorted(directory.glob("*.safetensors"))[-1]
        tensors, metadata = hostile.stored_tensors(file)
        mine = [t for t in tensors if t.name.startswith(module + ".")]
        config = json.loads((directory / "config.json").read_text())
        reference = logits(qcore.from_pretrained(directory))
        marker = tmp_path / "the-checkpoint-ran-code"
        problems = []
        fields = hostile.string_fields(config, metadata, mine, hostile.payload(marker))
        for index, (where, new_config, new_metadata, tensor) in enumerate(fields):
            case = hostile.write_copy(
                directory,
                tmp_path / f"case{index}",
                {tensor.name: tensor} if tensor is not None else None,
                metadata=new_metadata,
                config=new_config,
            )
            try:
                model = qcore.from_pretrained(case)
            except (qcore.CheckpointError, qcore.ConfigError):
                pass
            except Exception as error:  # anything else is a failure of the test, reported with the case
                problems.append(f"{where}: {type(error).__name__}: {error}")
            else:
                if not torch.equal(logits(model), reference):
                    problems.append(f"{where}: loaded, with logits that differ from the unchanged checkpoint's")
            if marker.exists():
                problems.append(f"{where}: THE EXPRESSION RAN")
                marker.unlink()
            shutil.rmtree(case)
        assert not problems, "\n".join(problems)

    @pytest.mark.slow
    def test_damaged_stored_tensors_are_refused(self, saved: tuple[Path, str], tmp_path: Path) -> None:
        """Each damaged stored tensor of a quantized module gives a ``CheckpointError``, never a silent load or a crash.

        For the module stored last in the saved checkpoint, each of its tensors in turn is deleted, truncated, cut to
        one element, given an extra dimension, stored with a dtype of the other kind, and (for strings and JSON)
        replaced by garbage or given a JSON field of the wrong type; the damaged tensor is moved to the end of the
        file. (Only a tensor the format lets a writer leave out may be deleted without an error, and only if exactly
        the undamaged model loads.) The loads run in a child process, so a kernel reading out of bounds fails the
        test instead of killing the suite. Fix: in ``load_weight``, before building the layer, check every stored
        tensor of the module against the module's shape and the config (dtype, exact shape, the packed size that
        bits, group size or block size imply, every JSON field's type and range) and raise
        ``qcore.CheckpointError(message, file=..., tensor=...)`` naming what was expected.
        """
        import json
        import subprocess

        import qcore

        directory, module = saved
        file = sorted(directory.glob("*.safetensors"))[-1]
        tensors, _ = hostile.stored_tensors(file)
        labels = {}
        for tensor in (t for t in tensors if t.name.startswith(module + ".")):
            damaged = [("deleted", None), *hostile.corruptions(tensor)]
            for how, replacement in damaged:
                case = f"case{len(labels):03d}"
                labels[case] = f"{tensor.name} {how}"
                hostile.write_copy(directory, tmp_path / case, {tensor.name: replacement})
        # One child process runs every case: starting one costs far more than a load of this model.
        child = subprocess.run(
            [sys.executable, "-m", "qcore.testing.hostile", *(str(tmp_path / case) for case in labels)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        reports = [json.loads(line) for line in child.stdout.splitlines() if line.startswith('{"case"')]
        outcomes = {r["case"]: r for r in reports if "outcome" in r}
        if child.returncode != 0:
            started = [r["case"] for r in reports if r.get("started") and r["case"] not in outcomes]
            crashed = labels[started[-1]] if started else "(before the first case)"
            pytest.fail(f"the loading process died (exit {child.returncode}) on {crashed}:\n{child.stderr[-3000:]}")
        assert outcomes.keys() == labels.keys(), f"no outcome for {sorted(labels.keys() - outcomes.keys())[:5]}"
        reference = hostile.digest(logits(qcore.from_pretrained(directory)))
        wrong = [
            f"{labels[case]}: {r['outcome']} {r['message'][:300]}".strip()
            for case, r in outcomes.items()
            # A tensor the format lets a writer leave out (bitsandbytes' weight_format marker) may be deleted, if
            # the model that loads is exactly the undamaged one.
            if r["outcome"] != "CheckpointError"
            and not (labels[case].endswith(" deleted") and r["digest"] == reference)
        ]
        assert not wrong, "damaged tensors not refused with a CheckpointError:\n" + "\n".join(wrong)

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
            checkpoints["llama"], {**self.config, skip_field: ["q_proj", "lm_head"]}, **self._quantizing()
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

    # -- dequantize and calibration ---------------------------------------------------------------------------

    def test_dequantize_inverts_load(self, quantized: dict[str, Any], checkpoints: dict[str, Path]) -> None:
        """``dequantize_module`` gives, for every quantized module, plain tensors of the original shapes that
        compute what the module computes (logits within ``dequantize_tolerance``) and lie within ``tolerance``
        of the full-precision weights the module was quantized from.

        Fix: implement ``dequantize_module(config, module_name, module, dtype)`` returning ``{"weight": [out, in]
        (``[in, out]`` for a ``Conv1D``), "bias": ...}`` in ``dtype``, built from exactly the tensors the module's
        forward uses (the kernel layer's ``weight.dequantize(dtype)``), without changing the module.
        """
        import qcore
        from qcore.convert import dequantize_module

        for arch, (model, _) in quantized.items():
            reference = qcore.from_pretrained(checkpoints[arch], dtype=self._dtype())
            worst = 0.0
            for name in model.qcore_applied:
                tensors = dequantize_module(model, name, self._dtype())
                original = reference.get_submodule(name).weight.detach()
                assert tensors["weight"].shape == original.shape, f"{arch} {name}: weight shape"
                assert tensors["weight"].dtype == self._dtype(), f"{arch} {name}: weight dtype"
                error = (tensors["weight"].float() - original.float()).abs().max() / original.float().abs().max()
                worst = max(worst, float(error))
            assert worst <= self.tolerance, f"{arch}: dequantized weights off by {worst:.4f} > {self.tolerance}"
            fresh = qcore.from_pretrained(checkpoints[arch], dict(self.config), **self._quantizing())
            expected = logits(fresh).float()
            error = (logits(qcore.dequantize(fresh)).float() - expected).abs().max() / expected.abs().max()
            assert error <= self.dequantize_tolerance, (
                f"{arch}: the dequantized model's logits differ by {error:.4f} > {self.dequantize_tolerance}"
            )
            assert not fresh.is_quantized and all(
                type(fresh.get_submodule(name)) is type(reference.get_submodule(name)) for name in model.qcore_applied
            ), f"{arch}: dequantize left quantized modules behind"

    def test_calibration_streams_one_block_at_a_time_when_needed(self, checkpoints: dict[str, Path]) -> None:
        """A config that needs calibration gets every decoder block in model order, later blocks still on the meta
        device, and the model's tensors never exceed the quantized model plus that one block in full precision; a
        config that does not is never handed a block, even when calibration data is given.

        Fix: in ``calibrate_block``, replace every module of ``context.block_modules(block_name)`` and keep no
        reference to the full-precision weights (nor to the Linears' input activations once the block is
        quantized); make ``needs_calibration`` true only for configs whose quantization uses the data.
        """
        import torch

        import qcore

        monitor = _CalibrationMonitor()
        qcore.register_plugin(monitor, "qcore-conformance-calibration")
        try:
            arguments = self._quantizing()
            if "calibration" not in arguments:
                arguments["calibration"] = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
                model = qcore.from_pretrained(checkpoints["llama"], dict(self.config), **arguments)
                assert monitor.blocks == [], "a config that needs no calibration was handed decoder blocks"
                assert model.is_quantized
                return
            model = qcore.from_pretrained(checkpoints["llama"], dict(self.config), **arguments)
        finally:
            qcore.unregister_plugin("qcore-conformance-calibration")
        assert monitor.blocks == [f"model.layers.{i}" for i in range(len(model.model.layers))]
        assert all(monitor.later_on_meta), "a block after the one being calibrated already held tensors"
        final = _tensor_nbytes(model)
        for block, held, block_nbytes in zip(monitor.blocks, monitor.held, monitor.block_nbytes, strict=True):
            assert held <= final + block_nbytes, (
                f"{block}: the model held {held} bytes, more than the quantized model ({final}) plus one block in "
                f"full precision ({block_nbytes})"
            )


class _CalibrationMonitor:
    """Measures, as each block reaches ``calibrate_block``, the bytes the whole model holds."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.held: list[int] = []
        self.block_nbytes: list[int] = []
        self.later_on_meta: list[bool] = []

    @hookimpl(wrapper=True)
    def calibrate_block(self, model: Any, block_name: str, block: Any) -> Any:
        self.blocks.append(block_name)
        self.held.append(_tensor_nbytes(model))
        self.block_nbytes.append(_tensor_nbytes(block))
        container, _, index = block_name.rpartition(".")
        later = list(model.get_submodule(container))[int(index) + 1 :]
        self.later_on_meta.append(all(p.device.type == "meta" for b in later for p in b.parameters()))
        return (yield)


def _tensor_nbytes(module: Any) -> int:
    """Bytes of the real (not meta) tensors a module holds, each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers(), *module.state_dict().values()):
        if tensor.device.type == "meta":
            continue
        key = (tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


BackendConformance._STANDARD = frozenset(name for name in vars(BackendConformance) if name.startswith("test_"))
