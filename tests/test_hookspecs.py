"""The hook spec's shape: six phases, named and ordered as documented, each fully documented."""

from __future__ import annotations

import inspect

import pytest
from qcore import hookspecs

PHASES = ["validate", "update_device_map", "preprocess_model", "load_weight", "postprocess", "optimize_runtime"]


def test_six_phases_in_order_in_the_file():
    source = inspect.getsource(hookspecs)
    positions = [source.index(f"\ndef {name}(") for name in PHASES]
    assert positions == sorted(positions)
    assert list(hookspecs.PHASES) == PHASES


def test_the_extension_hooks_sit_beside_the_phases_in_file_order():
    source = inspect.getsource(hookspecs)
    order = ["register_backend", *PHASES[:4], "calibrate_block", *PHASES[4:], "save_metadata", "dequantize_module"]
    positions = [source.index(f"\ndef {name}(") for name in order]
    assert positions == sorted(positions)
    assert hookspecs.EXTENSIONS == ("calibrate_block", "save_metadata", "dequantize_module")


@pytest.mark.parametrize("name", [*PHASES, "register_backend", *hookspecs.EXTENSIONS])
def test_every_hook_documents_arguments_returns_and_backend_duties(name):
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function)
    for parameter in inspect.signature(function).parameters:
        assert f":param {parameter}:" in doc, f"{name} does not document {parameter}"
    assert ":returns:" in doc
    assert "Implementing in a backend:" in doc


def test_only_load_weight_stops_at_first_result():
    firstresult = {name for name in PHASES if getattr(hookspecs, name).qcore_spec["firstresult"]}
    assert firstresult == {"load_weight"}
    assert "Stops at first non-None result" in inspect.getdoc(hookspecs.load_weight)


def test_dequantize_module_stops_at_first_result_and_the_others_collect():
    assert hookspecs.dequantize_module.qcore_spec["firstresult"]
    assert "Stops at first non-None result" in inspect.getdoc(hookspecs.dequantize_module)
    assert not hookspecs.calibrate_block.qcore_spec["firstresult"]
    assert not hookspecs.save_metadata.qcore_spec["firstresult"]
