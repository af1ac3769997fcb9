"""qcore-hqq end to end on tiny real architectures: quantize while loading, parity with hqq's HQQLinear, save and
reload, per-module settings, errors, kernels, memory estimates and LoRA training (CPU; one CUDA test)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest
import qcore
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear, Quantizer
from qcore.testing import build
from qcore_hqq import plugin
from qcore_hqq.config import HqqConfig, linear_tag
from qcore_hqq.kernels import pin_backend, pin_backends
from qcore_hqq.layers import STORED_KEYS
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

LAYERS = 2  # both tiny models have two blocks
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build("llama", tmp_path_factory.mktemp("tiny-llama"), dtype=torch.float32)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return build("gpt2", tmp_path_factory.mktemp("tiny-gpt2"), dtype=torch.float32, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids.to(model.device)).logits


def hqq_reference(model_class, path: Path, dtype: torch.dtype, settings_for) -> nn.Module:
    """The full-precision model with each Linear (or Conv1D) replaced by hqq's own HQQLinear, built by hand.

    ``settings_for(name)`` gives the layer's settings (``nbits``, ``group_size``, ``axis`` and optionally
    ``optimize``, ``view_as_float``) or ``None`` to keep it.
    """
    model = model_class.from_pretrained(path, dtype=dtype).eval()
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, Conv1D)) or (settings := settings_for(name)) is None:
            continue
        if isinstance(module, Conv1D):  # HQQLinear takes an nn.Linear: Conv1D's weight is the transpose
            linear = nn.Linear(*module.weight.shape, dtype=dtype)
            linear.weight.data, linear.bias.data = module.weight.data.t().contiguous(), module.bias.data
            module = linear
        quant_config = BaseQuantizeConfig(
            nbits=settings["nbits"], group_size=settings["group_size"], axis=settings["axis"],
            view_as_float=settings.get("view_as_float", False),
        )  # fmt: skip
        quant_config["weight_quant_params"]["optimize"] = settings.get("optimize", True)
        model.set_submodule(name, HQQLinear(module, quant_config, compute_dtype=dtype, device="cpu"))
    return model


def hqq_modules(model: nn.Module) -> dict[str, HQQLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HQQLinear)}


def no_requantization(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a pre-quantized checkpoint was quantized again")

    monkeypatch.setattr(Quantizer, "quantize", classmethod(refuse))


# -- on-the-fly quantization: parity, save, reload ------------------------------------------------------------------

CASES = [
    # nbits, group_size, axis, optimize, view_as_float, dtype
    (1, 64, 1, True, False, torch.float32),
    (2, 64, 1, True, False, torch.float32),
    (3, 64, 1, True, False, torch.float32),
    (4, 64, 1, True, False, torch.bfloat16),
    (8, 64, 0, True, True, torch.bfloat16),
    (3, 32, 0, True, True, torch.float32),
    (4, 128, 0, False, False, torch.float16),
    (2, None, 1, False, False, torch.float32),
]


@pytest.mark.parametrize(("nbits", "group_size", "axis", "optimize", "view_as_float", "dtype"), CASES)
def test_quantize_matches_hqqlinear_and_reloads_identically(
    llama_dir, input_ids, tmp_path, monkeypatch, nbits, group_size, axis, optimize, view_as_float, dtype
):
    settings = dict(nbits=nbits, group_size=group_size, axis=axis, optimize=optimize, view_as_float=view_as_float)
    model = qcore.from_pretrained(llama_dir, {"quant_method": "hqq", **settings}, dtype=dtype)

    quantized = hqq_modules(model)
    assert len(quantized) == 7 * LAYERS and type(model.lm_head) is nn.Linear
    reference = hqq_reference(LlamaForCausalLM, llama_dir, dtype, lambda name: None if name == "lm_head" else settings)
    # The same kernels as the qcore model (test_hqq_kernels.py bounds the kernel layer's against hqq's own matmul).
    pin_backends(hqq_modules(reference).values())
    expected = logits(model, input_ids)
    assert expected.dtype == dtype and torch.isfinite(expected).all()
    assert torch.equal(expected, logits(reference, input_ids))

    qcore.save_pretrained(model, tmp_path / "saved")
    no_requantization(monkeypatch)
    reloaded = qcore.from_pretrained(tmp_path / "saved", dtype=dtype)
    assert hqq_modules(reloaded).keys() == quantized.keys()
    assert torch.equal(logits(reloaded, input_ids), expected)


def test_saved_checkpoint_holds_hqq_state_dicts_and_transformers_config(llama_dir, tmp_path):
    config = HqqConfig(nbits=4, group_size=32)
    model = qcore.from_pretrained(llama_dir, config, dtype=torch.bfloat16)
    state = model.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    for name, layer in hqq_modules(model).items():
        keys = {key[len(name) + 1 :] for key in state if key.startswith(name + ".")}
        # The keys transformers writes (and its HQQ loader reads) for an HQQ layer: HQQLinear.state_dict's.
        assert keys == layer.state_dict_keys() - {"bias"} == STORED_KEYS

    out = qcore.save_pretrained(model, tmp_path / "saved")
    stored_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert stored_config == config.to_dict()
    with safe_open(out / "model.safetensors", "pt") as f:
        q_proj = {key.rsplit(".", 1)[1]: f.get_tensor(key) for key in f.keys() if ".0.self_attn.q_proj." in key}
    assert q_proj.keys() == STORED_KEYS
    assert q_proj["W_q"].dtype == torch.uint8 and q_proj["scale"].dtype == torch.bfloat16
    assert q_proj["shape"].tolist() == [64, 64] and int(q_proj["nbits"]) == 4 and int(q_proj["group_size"]) == 32


def test_readme_documents_every_stored_tensor():
    text = README.read_text()
    for key in STORED_KEYS | {"bias"}:
        assert re.search(rf"`{key}`", text), f"README does not document the stored tensor {key!r}"


def test_conv1d_layers_with_bias_gpt2(gpt2_dir, input_ids, tmp_path):
    settings = {"nbits": 4, "group_size": 64, "axis": 1}
    model = qcore.from_pretrained(gpt2_dir, {"quant_method": "hqq", **settings}, dtype=torch.float32)
    assert isinstance(model.transformer.h[0].attn.c_attn, HQQLinear)
    assert isinstance(model.transformer.h[0].attn.c_attn.bias, nn.Parameter)
    reference = hqq_reference(
        GPT2LMHeadModel, gpt2_dir, torch.float32, lambda name: None if name == "lm_head" else settings
    )
    expected = logits(model, input_ids)
    assert torch.equal(expected, logits(reference, input_ids))

    qcore.save_pretrained(model, tmp_path / "saved")
    reloaded = qcore.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert torch.equal(logits(reloaded, input_ids), expected)


# -- which modules, with which settings ------------------------------------------------------------------------------


def test_skip_modules_keep_full_precision(llama_dir):
    model = qcore.from_pretrained(
        llama_dir, {"quant_method": "hqq", "skip_modules": ["self_attn.q_proj", "mlp.down_proj"]}, dtype=torch.float32
    )
    kept = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    assert kept == {f"model.layers.{i}.{tag}" for i in range(LAYERS) for tag in ("self_attn.q_proj", "mlp.down_proj")}
    assert isinstance(model.lm_head, HQQLinear)  # a skip list of one's own replaces the default ["lm_head"]


def test_dynamic_config_gives_each_tag_its_settings(llama_dir, input_ids, tmp_path, monkeypatch):
    dynamic = {"self_attn.q_proj": {"nbits": 2, "group_size": 32}, "mlp.down_proj": {"nbits": 8, "group_size": 64}}
    model = qcore.from_pretrained(llama_dir, {"quant_method": "hqq", "dynamic_config": dynamic}, dtype=torch.bfloat16)
    for name, layer in hqq_modules(model).items():
        expected = dynamic[linear_tag(name)]
        assert (layer.meta["nbits"], layer.meta["group_size"]) == (expected["nbits"], expected["group_size"])
    assert {linear_tag(name) for name in hqq_modules(model)} == set(dynamic)
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear  # unlisted tags stay full precision

    def settings_for(name):
        settings = dynamic.get(linear_tag(name))
        return settings and {**settings, "axis": 1}

    reference = hqq_reference(LlamaForCausalLM, llama_dir, torch.bfloat16, settings_for)
    pin_backends(hqq_modules(reference).values())  # the qcore model's kernels (bounded in test_hqq_kernels.py)
    expected_logits = logits(model, input_ids)
    assert torch.equal(expected_logits, logits(reference, input_ids))

    qcore.save_pretrained(model, tmp_path / "saved")
    no_requantization(monkeypatch)
    reloaded = qcore.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert hqq_modules(reloaded).keys() == hqq_modules(model).keys()
    assert torch.equal(logits(reloaded, input_ids), expected_logits)


def test_unknown_dynamic_tag_is_refused(llama_dir):
    with pytest.raises(qcore.ConfigError, match=r"self_attn\.qproj.*match no linear layer"):
        qcore.from_pretrained(llama_dir, {"quant_method": "hqq", "dynamic_config": {"self_attn.qproj": {"nbits": 4}}})


def test_group_size_not_dividing_in_features_is_a_config_error_when_strict(llama_dir):
    with pytest.raises(qcore.ConfigError, match=r"'group_size'=48 does not divide in_features=64.*strict_group_size"):
        qcore.from_pretrained(llama_dir, {"quant_method": "hqq", "group_size": 48, "strict_group_size": True})


# -- availability and placement ------------------------------------------------------------------------------------


def fake_hqq_version(monkeypatch, version: str | None) -> None:
    real = importlib.metadata.version

    def version_of(name: str) -> str:
        if name == "hqq":
            if version is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return version
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version_of)


@pytest.mark.parametrize(("version", "message"), [(None, "hqq is not installed"), ("0.1.7", "hqq 0.1.7 is too old")])
def test_missing_or_old_hqq_is_backend_unavailable_with_the_pip_command(llama_dir, monkeypatch, version, message):
    fake_hqq_version(monkeypatch, version)
    with pytest.raises(qcore.BackendUnavailable, match=f"{message}.*pip install"):
        plugin.validate(config=HqqConfig(), context=None)
    with pytest.raises(qcore.BackendUnavailable, match=f"{message}.*pip install"):
        qcore.from_pretrained(llama_dir, {"quant_method": "hqq"})
    (info,) = [b for b in qcore.backends() if b.distribution == "qcore-hqq"]
    assert not info.available and "pip install" in info.reason


def test_hqq_that_fails_to_import_is_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    with pytest.raises(qcore.BackendUnavailable, match="does not import.*pip install --force-reinstall"):
        plugin.validate(config=HqqConfig(), context=None)


def test_offloading_hqq_layers_beside_an_accelerator_is_refused():
    from qcore.context import LoadContext

    modules = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    context = LoadContext(Path("."), None, False, torch.float32, {}, None, modules=modules)  # type: ignore[arg-type]

    def update(device_map):
        return plugin.update_device_map(config=HqqConfig(), context=context, device_map=device_map)

    assert update({"": "cpu"}) is None
    assert update({"": "cuda:0", "lm_head": "cpu"}) is None  # only HQQ layers matter
    with pytest.raises(qcore.ConfigError, match=r"'model\.layers\.1\.self_attn\.q_proj' is mapped to 'cpu'.*skip_mod"):
        update({"": "cuda:0", "model.layers.1": "cpu"})
    with pytest.raises(qcore.ConfigError, match=r"is mapped to 'disk'"):
        update({"model.layers.0": 0, "model.layers.1": "disk"})


# -- kernels ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_4bit(llama_dir):
    from qcore.plugins import preset_config

    return qcore.from_pretrained(llama_dir, preset_config("hqq-4bit"), dtype=torch.float32)


def test_cpu_backend_is_pinned_per_layer(llama_4bit, llama_dir, input_ids):
    assert llama_4bit.qcore_kernels == {"qcore-hqq": "hqq PYTORCH"}
    layers = hqq_modules(llama_4bit).values()
    assert all(layer.forward.__func__ is HQQLinear.forward_pytorch_backprop for layer in layers)

    expected = logits(llama_4bit, input_ids)
    previous = HQQLinear.backend
    try:
        HQQLinear.set_backend(HQQBackend.PYTORCH_FORWARD)  # class-wide, as other code may do
        other = qcore.from_pretrained(llama_dir, {"quant_method": "hqq", "nbits": 2}, dtype=torch.float32)
        assert all(layer.forward.__func__ is HQQLinear.forward_pytorch_backprop for layer in layers)
        assert all(
            layer.forward.__func__ is HQQLinear.forward_pytorch_backprop for layer in hqq_modules(other).values()
        )
    finally:
        HQQLinear.set_backend(previous)

    for layer in layers:
        pin_backend(layer, HQQBackend.PYTORCH_FORWARD)
    try:
        assert torch.equal(logits(llama_4bit, input_ids), expected)
    finally:
        for layer in layers:
            pin_backend(layer, HQQBackend.PYTORCH)


# -- memory ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(("group_size", "axis", "view_as_float"), [(64, 1, False), (32, 0, True), (None, 1, False)])
@pytest.mark.parametrize(("out_features", "in_features"), [(128, 64), (64, 256)])
def test_quantized_nbytes_is_exact(nbits, group_size, axis, view_as_float, out_features, in_features):
    config = HqqConfig(nbits=nbits, group_size=group_size, axis=axis, view_as_float=view_as_float)
    linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    layer = HQQLinear(linear, config.quant_config_for("layer"), compute_dtype=torch.bfloat16, device="cpu")
    actual = layer.W_q.nbytes + layer.meta["scale"].nbytes + layer.meta["zero"].nbytes
    assert config.quantized_nbytes(out_features, in_features, torch.finfo(torch.bfloat16).bits // 8) == actual


def test_memory_estimate_within_5_percent(llama_dir):
    from accelerate import init_empty_weights
    from qcore.loading import estimate_nbytes

    config = HqqConfig(nbits=3, group_size=32)
    model = qcore.from_pretrained(llama_dir, config, dtype=torch.bfloat16)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(AutoConfig.from_pretrained(llama_dir)).to(torch.bfloat16)
    applied = {name: config for name in hqq_modules(model)}
    estimate = sum(estimate_nbytes(skeleton, applied, torch.bfloat16).values())
    real = sum(p.nbytes for p in model.parameters()) + sum(
        layer.meta["scale"].nbytes + layer.meta["zero"].nbytes for layer in hqq_modules(model).values()
    )
    assert abs(estimate - real) <= 0.05 * real


# -- training ----------------------------------------------------------------------------------------------------------


def test_lora_training_step_on_cpu(llama_dir, input_ids):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.hqq import HqqLoraLinear

    model = qcore.from_pretrained(llama_dir, {"quant_method": "hqq", "nbits": 4}, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, HqqLoraLinear)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)

    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


# -- CUDA --------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_the_compiled_backend_and_matches_cpu(llama_dir, input_ids, tmp_path):
    config = {"quant_method": "hqq", "nbits": 4, "group_size": 64}
    on_cpu = qcore.from_pretrained(llama_dir, config, dtype=torch.float16)
    expected = logits(on_cpu, input_ids).float()
    qcore.save_pretrained(on_cpu, tmp_path / "saved")

    # The same stored weights on the GPU: only the kernels differ.
    reloaded = qcore.from_pretrained(tmp_path / "saved", dtype=torch.float16, device_map="cuda:0")
    assert reloaded.qcore_kernels == {"qcore-hqq": "hqq PYTORCH_COMPILE"}
    assert all(layer.W_q.is_cuda for layer in hqq_modules(reloaded).values())
    torch.testing.assert_close(logits(reloaded, input_ids).float().cpu(), expected, rtol=1e-2, atol=1e-2)

    # Quantized on the GPU (hqq's solver runs in fp16 there): close to the CPU quantization, not bit-equal.
    on_gpu = qcore.from_pretrained(llama_dir, config, dtype=torch.float16, device_map="cuda:0")
    assert torch.isfinite(logits(on_gpu, input_ids)).all()
    torch.testing.assert_close(logits(on_gpu, input_ids).float().cpu(), expected, rtol=0.1, atol=0.1)
