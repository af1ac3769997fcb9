"""README's "Checkpoints and transformers" table, line by line: which checkpoints qcore writes that transformers'
own ``from_pretrained`` loads, and what it does with the others.

A line that fails here means the table is out of date (a transformers release changed what it reads): fix the
README with it.
"""

from __future__ import annotations

import importlib.util

import pytest
import qcore
import torch
import transformers
from qcore.testing.models import build
from tiny_models import logits

BNB_NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
BNB_INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
HQQ = {"quant_method": "hqq", "nbits": 4, "group_size": 64}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build("llama", tmp_path_factory.mktemp("interop") / "llama", hidden_size=128, intermediate_size=256)


def saved(llama, tmp_path, config):
    """The directory qcore saves ``config``'s quantization of ``llama`` to, and qcore's reload of it."""
    qcore.save_pretrained(qcore.from_pretrained(llama, config), tmp_path / "out")
    return tmp_path / "out", qcore.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("config", [BNB_NF4, BNB_INT8], ids=["nf4", "int8"])
def test_transformers_loads_bitsandbytes_checkpoints_with_the_same_logits(llama, tmp_path, config):
    path, reloaded = saved(llama, tmp_path, config)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(logits(theirs), logits(reloaded))


def test_qcore_loads_the_bitsandbytes_checkpoints_transformers_writes(llama, tmp_path):
    pytest.importorskip("qcore_bnb")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        llama, quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    theirs.save_pretrained(tmp_path / "theirs")
    assert torch.equal(logits(qcore.from_pretrained(tmp_path / "theirs")), logits(theirs))


def test_transformers_silently_returns_random_weights_for_an_hqq_checkpoint(llama, tmp_path):
    path, reloaded = saved(llama, tmp_path, HQQ)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path)  # no error, no warning that counts
    assert type(theirs.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert (logits(theirs).float() - logits(reloaded).float()).abs().max() > 0.1


def test_transformers_silently_returns_random_weights_for_a_mixed_recipe(llama, tmp_path):
    pytest.importorskip("qcore_bnb")
    pytest.importorskip("qcore_hqq")
    recipe = qcore.Recipe([("*self_attn*", BNB_INT8), ("*mlp*", HQQ)], default=None)
    path, reloaded = saved(llama, tmp_path, recipe)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert (logits(theirs).float() - logits(reloaded).float()).abs().max() > 0.1


@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None, reason="needs an environment without kernels")
def test_transformers_needs_the_kernels_package_for_an_eetq_checkpoint(llama, tmp_path):
    path, _ = saved(llama, tmp_path, {"quant_method": "eetq"})
    with pytest.raises(ImportError, match="requires kernels"):
        transformers.AutoModelForCausalLM.from_pretrained(path)
