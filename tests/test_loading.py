"""The loader and saver end to end with the test backend, and plain loads matching transformers."""

from __future__ import annotations

import json

import pytest
import qcore
import tiny_models
import torch
import toy_backend
import transformers
from tiny_models import logits

TOY = {"quant_method": "toy_int8"}


def reference(path, dtype=None):
    return _auto_class(path).from_pretrained(path, dtype=dtype)


def _auto_class(path):
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture)


@pytest.mark.parametrize("arch", list(tiny_models.ARCHITECTURES))
def test_plain_checkpoint_without_config_loads_unquantized_like_transformers(checkpoints, arch):
    path = checkpoints[arch]
    model = qcore.from_pretrained(path)
    expected = reference(path)
    assert not getattr(model, "is_quantized", False)
    assert torch.equal(logits(model), logits(expected))
    assert model.dtype == expected.dtype == torch.bfloat16


def test_dtype_argument_casts_full_precision_weights(llama):
    model = qcore.from_pretrained(llama, dtype=torch.float32)
    assert torch.equal(logits(model), logits(reference(llama, dtype=torch.float32)))


def test_toy_backend_runs_all_six_phases_in_order(llama, toy):
    model = qcore.from_pretrained(llama, TOY)
    phases = [phase for phase, _ in toy_backend.CALLS]
    assert phases == ["validate", "update_device_map", "preprocess_model", "postprocess", "optimize_runtime"]
    owned = toy_backend.CALLS[2][1]
    assert "lm_head" not in owned and len(owned) == 14  # 7 linears x 2 layers; lm_head kept like transformers
    assert model.is_quantized and model.quantization_method == "toy_int8"
    assert model.qcore_kernels == {"toy": "toy-dequant-matmul"}
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "ToyLinear"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    error = (logits(model).float() - logits(reference(llama)).float()).abs().max()
    assert 0 < error < 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "bert"])
def test_quantize_save_reload_is_identical_without_requantizing(checkpoints, toy, tmp_path, arch, monkeypatch):
    model = qcore.from_pretrained(checkpoints[arch], TOY)
    qcore.save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "toy_int8",
        "compute_dtype": None,
        "modules_to_not_convert": None,
    }
    monkeypatch.setattr(toy_backend, "quantize", lambda *_: pytest.fail("re-quantized a pre-quantized checkpoint"))
    reloaded = qcore.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(reloaded), logits(model))


#: One config per in-repo backend (and the test-only one), for the save/reload identity below.
ROUND_TRIP_CONFIGS = {
    "toy": TOY,
    "bnb-nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "bnb-int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
    "hqq-4bit": {"quant_method": "hqq", "nbits": 4, "group_size": 64},
    "eetq": {"quant_method": "eetq"},
}


def layout(model):
    """Every tensor the model holds or saves, as (dtype, shape, strides): what a kernel sees besides the values."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tensors.update({f"state_dict:{k}": v for k, v in model.state_dict().items()})
    return {name: (t.dtype, tuple(t.shape), t.stride()) for name, t in tensors.items()}


@pytest.mark.parametrize("method", list(ROUND_TRIP_CONFIGS))
@pytest.mark.parametrize("arch", list(tiny_models.ARCHITECTURES))
def test_a_loaded_model_is_laid_out_as_its_reload_and_computes_the_same(checkpoints, toy, tmp_path, arch, method):
    """A reload reads contiguous tensors from the file; a model quantized in memory must hold the same layout, or
    CPU bf16 matmuls (which round a transposed operand differently on CPUs without AMX) give other logits."""
    model = qcore.from_pretrained(checkpoints[arch], ROUND_TRIP_CONFIGS[method])
    qcore.save_pretrained(model, tmp_path / "out")
    reloaded = qcore.from_pretrained(tmp_path / "out")
    assert layout(reloaded) == layout(model)
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("method", list(ROUND_TRIP_CONFIGS))
def test_a_model_saved_after_a_forward_saves_what_it_loaded(checkpoints, toy, tmp_path, method):
    """A kernel may repack a layer at its first forward (bitsandbytes 4-bit on AVX512-BF16 CPUs); saving then must
    still write the loaded tensors, and the reload compute what the saved model computes."""
    model = qcore.from_pretrained(checkpoints["llama"], ROUND_TRIP_CONFIGS[method])
    loaded = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    first = logits(model)
    qcore.save_pretrained(model, tmp_path / "out")
    saved = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[name], tensor) for name, tensor in loaded.items())
    assert torch.equal(logits(qcore.from_pretrained(tmp_path / "out")), first)
    assert torch.equal(logits(model), first)


def test_a_tied_output_layer_stays_in_full_precision_under_a_config_skip_list(checkpoints):
    """hqq's own skip list (``["lm_head"]``) replaces transformers' defaults; BERT's decoder is tied to the word
    embeddings all the same, and a quantized layer would leave tie_weights nothing to tie."""
    model = qcore.from_pretrained(checkpoints["bert"], ROUND_TRIP_CONFIGS["hqq-4bit"])
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert "cls.predictions.decoder" not in model.qcore_applied


def test_saved_files_are_safetensors_only(llama, toy, tmp_path):
    qcore.save_pretrained(qcore.from_pretrained(llama, TOY), tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]


def test_sharded_save_writes_an_index_and_reloads(llama, toy, tmp_path):
    model = qcore.from_pretrained(llama, TOY)
    qcore.save_pretrained(model, tmp_path / "out", max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.equal(logits(qcore.from_pretrained(tmp_path / "out")), logits(model))


def test_user_loading_attribute_overrides_the_checkpoint(llama, toy, tmp_path):
    qcore.save_pretrained(qcore.from_pretrained(llama, TOY), tmp_path / "out")
    model = qcore.from_pretrained(tmp_path / "out", {"quant_method": "toy_int8", "compute_dtype": "float32"})
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32
    assert model.config.quantization_config["compute_dtype"] == "float32"


def test_user_skip_list_replaces_the_defaults(llama, toy):
    model = qcore.from_pretrained(
        llama, {**TOY, "modules_to_not_convert": ["up_proj"]}
    )  # suffix match, as transformers
    assert type(model.lm_head).__name__ == "ToyLinear"
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "ToyLinear"


def test_tied_embeddings_stay_tied_and_unquantized(checkpoints, toy):
    model = qcore.from_pretrained(checkpoints["qwen2"], TOY)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_generate_works_on_a_quantized_model(llama, toy):
    model = qcore.from_pretrained(llama, TOY)
    out = model.generate(tiny_models.INPUT_IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, tiny_models.INPUT_IDS.shape[1] + 4)


def test_observer_wrapper_sees_every_phase(llama, toy):
    seen = []

    class Timer:
        @qcore.hookimpl(wrapper=True)
        def load_weight(self, config, context, model, module_name, tensor_name, tensor):
            seen.append("load_weight")
            return (yield)

        @qcore.hookimpl(wrapper=True)
        def postprocess(self, config, context, model):
            seen.append("postprocess")
            return (yield)

    qcore.register_plugin(Timer(), "timer")
    try:
        qcore.from_pretrained(llama, TOY)
    finally:
        qcore.unregister_plugin("timer")
    assert seen.count("postprocess") == 1 and seen.count("load_weight") == 14


def test_save_refuses_a_non_empty_directory_and_leaves_it_alone(llama, toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = qcore.from_pretrained(llama, TOY)
    with pytest.raises(qcore.CheckpointError, match="overwrite=True"):
        qcore.save_pretrained(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_save_leaves_the_destination_exactly_as_it_was(llama, toy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    model = qcore.from_pretrained(llama, TOY)
    qcore.save_pretrained(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import safetensors.torch

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(qcore.CheckpointError, match=f"file {out}: cannot write the checkpoint .*disk full"):
        qcore.save_pretrained(model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def test_loading_never_writes_into_the_source(llama, toy):
    before = {p.name: p.stat().st_mtime_ns for p in llama.iterdir()}
    qcore.from_pretrained(llama, TOY)
    assert {p.name: p.stat().st_mtime_ns for p in llama.iterdir()} == before


class _Taker:
    """Makes each toy unit take one more module in preprocess_model, before the toy replaces its modules."""

    def __init__(self, name: str):
        self.name = name

    @qcore.hookimpl(wrapper=True)
    def preprocess_model(self, config, context, model):
        if context.modules and not context.modules[0].endswith("mlp.up_proj"):
            context.take(self.name)
        return (yield)


def test_a_backend_takes_a_module_the_core_kept_and_owns_it_to_the_end(llama, toy):
    qcore.register_plugin(_Taker("lm_head"), "taker")
    try:
        model = qcore.from_pretrained(llama, TOY)
    finally:
        qcore.unregister_plugin("taker")
    assert type(model.lm_head).__name__ == "ToyLinear" and "lm_head" in model.qcore_applied
    assert model.lm_head.weight.dtype == torch.int8  # its tensor reached the toy's load_weight
    dense = qcore.dequantize(model)
    assert type(dense.lm_head) is torch.nn.Linear


def test_two_backends_cannot_take_one_module(llama, toy):
    recipe = qcore.Recipe([("*mlp.up_proj", TOY), ("*", {**TOY, "compute_dtype": "float32"})])
    qcore.register_plugin(_Taker("model.layers.0.mlp.up_proj"), "taker")
    try:
        with pytest.raises(qcore.PluginError, match="took module 'model.layers.0.mlp.up_proj', which"):
            qcore.from_pretrained(llama, recipe)
    finally:
        qcore.unregister_plugin("taker")
