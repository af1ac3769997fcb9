"""A test-only backend: per-row absmax int8 weights, stored as ``weight`` (int8) and ``weight_scale``.

Small enough to read in a minute, it runs every one of the six phases so the core's own tests exercise the whole
pipeline without any real quantization library.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import qcore
from qcore import hookimpl

CALLS: list[tuple[str, tuple[str, ...]]] = []


@dataclasses.dataclass
class ToyConfig(qcore.QuantConfig):
    quant_method: ClassVar[str] = "toy_int8"
    loading_attributes: ClassVar[frozenset[str]] = frozenset({"compute_dtype"})

    compute_dtype: str | None = None
    modules_to_not_convert: list[str] | None = None

    def check(self) -> None:
        qcore.config.dtype_name(self.compute_dtype, field="compute_dtype", method=self.quant_method)

    def skip_modules(self):
        return self.modules_to_not_convert

    def quantized_nbytes(self, out_features, in_features, dtype_nbytes):
        return out_features * in_features + out_features * 4


def _linear_class():
    import torch
    from torch import nn

    class ToyLinear(nn.Module):
        def __init__(self, in_features, out_features, bias, compute_dtype):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.compute_dtype = compute_dtype
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
            self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

        def forward(self, x):
            w = self.weight.to(torch.float32) * self.weight_scale[:, None]
            dtype = self.compute_dtype or x.dtype
            out = x.to(dtype) @ w.to(dtype).T
            if self.bias is not None:
                out = out + self.bias.to(dtype)
            return out.to(x.dtype)

    return ToyLinear


def quantize(weight):
    import torch

    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class ToyPlugin:
    """The hook implementations, as a class so tests can register fresh instances."""

    def __init__(self, name="toy"):
        self.name = name

    @hookimpl
    def register_backend(self):
        return qcore.Backend(
            name=self.name,
            configs={"toy_int8": ToyConfig},
            presets=(qcore.Preset("toy-int8", {"quant_method": "toy_int8"}, summary="test backend"),),
        )

    @hookimpl
    def validate(self, config, context):
        CALLS.append(("validate", ()))

    @hookimpl
    def update_device_map(self, config, context, device_map):
        CALLS.append(("update_device_map", context.modules))
        return None

    @hookimpl
    def preprocess_model(self, config, context, model):
        import torch

        CALLS.append(("preprocess_model", context.modules))
        ToyLinear = _linear_class()
        dtype = getattr(torch, config.compute_dtype) if config.compute_dtype else None
        for name in context.modules:
            old = model.get_submodule(name)
            # GPT-2's Conv1D stores its weight transposed (in, out); the toy stores (out, in) like nn.Linear.
            transposed = type(old).__name__ == "Conv1D"
            out_features, in_features = old.weight.shape[::-1] if transposed else old.weight.shape
            with torch.device("meta"):
                new = ToyLinear(in_features, out_features, old.bias is not None, dtype)
            new.transposed = transposed
            model.set_submodule(name, new)

    @hookimpl
    def load_weight(self, config, context, model, module_name, tensor_name, tensor):
        if tensor_name == "bias":
            return None
        if context.pre_quantized:
            gathered = context.gather(module_name, tensor_name, tensor)
            if gathered is None:
                return {}
            return {"weight": gathered["weight"], "weight_scale": gathered["weight_scale"].to(torch_float32())}
        if model.get_submodule(module_name).transposed:
            tensor = tensor.T
        q, scale = quantize(tensor.to(context.dtype))
        return {"weight": q, "weight_scale": scale}

    @hookimpl
    def postprocess(self, config, context, model):
        CALLS.append(("postprocess", context.modules))

    @hookimpl
    def optimize_runtime(self, config, context, model):
        CALLS.append(("optimize_runtime", context.modules))
        context.report_kernel("toy-dequant-matmul")

    @hookimpl
    def dequantize_module(self, config, module_name, module, dtype):
        import torch

        weight = (module.weight.to(torch.float32) * module.weight_scale[:, None]).to(dtype)
        tensors = {"weight": weight.T.contiguous() if module.transposed else weight}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach().to(dtype)
        return tensors


def torch_float32():
    import torch

    return torch.float32


plugin = ToyPlugin()
