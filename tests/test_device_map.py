"""Device maps through accelerate, and placements no device here can serve, refused before reading weights."""

from __future__ import annotations

import pytest
import qcore
import torch
from tiny_models import logits

TOY = {"quant_method": "toy_int8"}


@pytest.mark.parametrize("device_map", ["cpu", "auto", "balanced", "sequential", {"": "cpu"}, None])
def test_cpu_device_maps_load_the_same_model(llama, toy, device_map):
    model = qcore.from_pretrained(llama, TOY, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(logits(model), logits(qcore.from_pretrained(llama, TOY)))


def test_explicit_per_module_map_is_honoured(llama, toy):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = qcore.from_pretrained(llama, TOY, device_map=device_map)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_placement_without_cuda_names_module_and_device(llama, toy, monkeypatch):
    read = []
    monkeypatch.setattr(qcore.checkpoint.CheckpointReader, "stream", lambda self, *a: read.append(1) or iter(()))
    with pytest.raises(qcore.ConfigError, match=r"module 'model.layers' on 'cuda:0' but this machine has 0 CUDA"):
        qcore.from_pretrained(llama, TOY, device_map={"model.layers": "cuda:0", "": "cpu"})
    assert read == []


def test_disk_offload_is_refused_with_the_module_named(llama, toy):
    with pytest.raises(qcore.ConfigError, match="module 'lm_head' on 'disk'"):
        qcore.from_pretrained(llama, TOY, device_map={"": "cpu", "lm_head": "disk"})


def test_auto_with_too_little_max_memory_is_refused_before_loading(llama, toy):
    with pytest.raises(qcore.ConfigError, match="on 'disk'"):
        qcore.from_pretrained(llama, TOY, device_map="auto", max_memory={"cpu": 20_000})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_across_cpu_and_gpu_runs_forward(llama, toy):
    device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": 0,
        "lm_head": "cpu",
    }
    model = qcore.from_pretrained(llama, TOY, device_map=device_map)
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert torch.isfinite(logits(model).float()).all()
