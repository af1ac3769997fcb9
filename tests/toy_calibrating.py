"""A test-only calibrating backend: the toy int8 scheme, applied one decoder block at a time by ``calibrate_block``.

Its quantization ignores the activations (so its model must equal the toy backend's), but it records everything
the core hands it, so tests can check the mechanism: block order, full-precision tensors, the inputs of each block,
what is still on the meta device, and what each Linear saw while the block ran.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import ClassVar

import qcore
import toy_backend
from qcore import hookimpl


@dataclasses.dataclass
class CalibratedConfig(toy_backend.ToyConfig):
    quant_method: ClassVar[str] = "toy_calibrated"
    needs_calibration: ClassVar[bool] = True


class CalibratingPlugin(toy_backend.ToyPlugin):
    """Records per block: its inputs, its Linears' input activations, and the state of the whole model."""

    def __init__(self, name="toy-calibrating"):
        super().__init__(name)
        self.blocks: list[str] = []
        self.inputs: dict[str, list] = {}
        self.activations: dict[str, int] = {}
        self.meta_after: dict[str, bool] = {}
        self.earlier_in_full_precision: dict[str, bool] = {}
        self.dtypes: set = set()
        #: Full-precision modules of earlier blocks still alive when a block is calibrated (the core must free them).
        self.alive_earlier: dict[str, list[str]] = {}
        self._replaced: list[tuple[str, object]] = []

    @hookimpl
    def register_backend(self):
        return qcore.Backend(
            name=self.name,
            configs={"toy_calibrated": CalibratedConfig},
            presets=(qcore.Preset("toy-calibrated", {"quant_method": "toy_calibrated"}, needs_calibration=True),),
        )

    @hookimpl
    def preprocess_model(self, config, context, model):
        if not context.calibrating:  # a pre-quantized reload: build the toy layers as the toy backend does
            super().preprocess_model(config, context, model)

    @hookimpl
    def calibrate_block(self, config, context, model, block_name, block, inputs):
        import gc

        from torch import nn
        from transformers.pytorch_utils import Conv1D

        self.blocks.append(block_name)
        gc.collect()
        self.alive_earlier[block_name] = [name for name, ref in self._replaced if ref() is not None]
        self.inputs[block_name] = [h.clone() for h in inputs.hidden_states()]
        names = list(context.block_modules(block_name))
        position = int(block_name.rsplit(".", 1)[1])
        blocks = model.get_submodule(block_name.rsplit(".", 1)[0])
        self.meta_after[block_name] = all(
            p.device.type == "meta" for later in list(blocks)[position + 1 :] for p in later.parameters()
        )
        prefix = block_name.rsplit(".", 1)[0]
        earlier = [n for n in context.modules if int(n[len(prefix) + 1 :].split(".")[0]) < position]
        self.earlier_in_full_precision[block_name] = any(
            type(model.get_submodule(n)).__name__ != "ToyLinear" for n in earlier
        )
        seen: dict[str, int] = {}
        handles = [
            model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, seen.get(n, 0) + 1))
            for n in names
        ]
        inputs.run(block)
        for handle in handles:
            handle.remove()
        self.activations.update(seen)
        ToyLinear = toy_backend._linear_class()
        for name in names:
            old = model.get_submodule(name)
            assert isinstance(old, (nn.Linear, Conv1D)) and old.weight.device.type != "meta"
            self.dtypes.add(old.weight.dtype)
            transposed = isinstance(old, Conv1D)
            weight = old.weight.T if transposed else old.weight
            q, scale = toy_backend.quantize(weight.to(context.dtype))
            new = ToyLinear(weight.shape[1], weight.shape[0], old.bias is not None, None)
            new.weight = nn.Parameter(q, requires_grad=False)
            new.weight_scale = scale
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
            new.transposed = transposed
            model.set_submodule(name, new)
            self._replaced.append((name, weakref.ref(old)))
