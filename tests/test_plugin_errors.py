"""A plugin raising in any phase gives a PluginError naming plugin, phase and module, and no model."""

from __future__ import annotations

import pytest
import qcore
import toy_backend
from qcore import hookspecs


class FailingIn(toy_backend.ToyPlugin):
    """The toy backend, breaking in one phase."""

    def __init__(self, phase):
        super().__init__("failing")
        self.phase = phase

    def _maybe_fail(self, phase):
        if phase == self.phase:
            raise RuntimeError(f"boom in {phase}")

    @qcore.hookimpl
    def validate(self, config, context):
        self._maybe_fail("validate")

    @qcore.hookimpl
    def update_device_map(self, config, context, device_map):
        self._maybe_fail("update_device_map")

    @qcore.hookimpl
    def preprocess_model(self, config, context, model):
        self._maybe_fail("preprocess_model")
        super().preprocess_model(config, context, model)

    @qcore.hookimpl
    def load_weight(self, config, context, model, module_name, tensor_name, tensor):
        self._maybe_fail("load_weight")
        return super().load_weight(config, context, model, module_name, tensor_name, tensor)

    @qcore.hookimpl
    def postprocess(self, config, context, model):
        self._maybe_fail("postprocess")

    @qcore.hookimpl
    def optimize_runtime(self, config, context, model):
        self._maybe_fail("optimize_runtime")


@pytest.mark.parametrize("phase", hookspecs.PHASES)
def test_plugin_error_names_plugin_phase_and_module(llama, phase):
    qcore.register_plugin(FailingIn(phase), "failing", distribution="qcore-failing")
    try:
        with pytest.raises(qcore.PluginError) as caught:
            qcore.from_pretrained(llama, {"quant_method": "toy_int8"})
    finally:
        qcore.unregister_plugin("failing")
    error = caught.value
    assert (error.plugin, error.phase) == ("qcore-failing", phase)
    assert f"boom in {phase}" in str(error) and "QCORE_LOAD_PLUGINS" in str(error)
    if phase == "load_weight":
        assert error.where.startswith("model.layers.0.")
    elif phase != "validate":
        assert "model.layers.0.self_attn.q_proj" in error.where


def test_deliberate_qcore_errors_pass_through_unwrapped(llama):
    class Refusing(toy_backend.ToyPlugin):
        @qcore.hookimpl
        def validate(self, config, context):
            raise qcore.BackendUnavailable("toy needs a GPU: run on a machine with CUDA")

    qcore.register_plugin(Refusing(), "refusing")
    try:
        with pytest.raises(qcore.BackendUnavailable, match="run on a machine with CUDA"):
            qcore.from_pretrained(llama, {"quant_method": "toy_int8"})
    finally:
        qcore.unregister_plugin("refusing")
