"""Loading GGUF files of real architectures against transformers' own ``gguf_file=`` load of the same file, which
dequantizes every tensor with the gguf package: logits, kernels, what stays quantized, save/reload, dequantize and
convert, and how a file is found (a path, a directory, ``gguf_file=``, a hub id).

The bounds. Types without a kernel (Q5_0, Q5_1, the K-quants, F32/F16/BF16) are dequantized with the same float32
operations the gguf package uses, so their logits equal transformers' bit for bit. Q4_0/Q4_1/Q8_0 run through
``qcore.kernels``, whose weight is ``(q - zero) * scale``: in float32 the logits are then within 1e-5 of the largest
logit (Q4_1's ``d * q + m`` rewritten moves each weight by float rounding), and in bfloat16, where the int4 kernel
runs with its scales rounded to bfloat16, within 2% of transformers' float32 load and no further from it than twice
transformers' own bfloat16 load is.
"""

from __future__ import annotations

import json
import shutil

import gguf
import huggingface_hub
import numpy as np
import pytest
import qcore
import torch
from gguf_files import hf_model
from huggingface_hub import constants
from qcore_gguf import blocks
from qcore_gguf.config import KERNEL_TYPES, SUPPORTED_TYPES
from qcore_gguf.layers import GgufLinear
from qcore_gguf.reader import GgufReader
from torch import nn

#: The types a tied table runs its head on the kernel layer in (a tied table in another type is dequantized).
TIED_KERNEL_TYPES = ("Q4_0", "Q4_1", "Q8_0")
#: The architectures transformers' GGUF mapping loads (it cannot map Mistral: see test_mistral_...).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gpt2")


def relative(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


def gguf_layers(model) -> list[GgufLinear]:
    return [m for m in model.modules() if type(m) is GgufLinear]  # Linear layers, not a GgufEmbedding table


def assert_matches(result: torch.Tensor, reference: torch.Tensor, type_name: str) -> None:
    if type_name in KERNEL_TYPES:
        assert relative(result, reference) <= 1e-5
    else:
        assert torch.equal(result, reference)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_is_the_one_transformers_makes(gguf_file, arch):
    from transformers import AutoConfig

    path = gguf_file(arch, "Q8_0")
    ours = GgufReader(path).model_config().to_dict()
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()
    assert ours.pop("quantization_config")["quant_method"] == "gguf"
    assert ours.pop("architectures") == [{"gpt2": "GPT2LMHeadModel"}.get(arch, f"{type(hf_model(arch)).__name__}")]
    theirs.pop("architectures", None)
    assert ours == theirs


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_every_block_type_matches_transformers(gguf_file, transformers_load, logits_of, type_name):
    path = gguf_file("llama", type_name)
    model = qcore.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert_matches(logits_of(model), logits_of(transformers_load(path)), type_name)
    layers = gguf_layers(model)
    assert len(layers) == 2 * 7 + 1 and {layer.type_name for layer in layers} == {type_name}
    assert all(layer.packed is not None for layer in layers) == (type_name in KERNEL_TYPES)


@pytest.mark.parametrize("type_name", ["F16", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architectures_match_transformers(gguf_file, transformers_load, logits_of, arch, type_name):
    path = gguf_file(arch, type_name)
    model = qcore.from_pretrained(path, dtype=torch.float32)
    reference = transformers_load(path)
    assert type(model) is type(reference)
    assert_matches(logits_of(model), logits_of(reference), type_name)


def test_mistral_which_transformers_cannot_map_loads_exactly(gguf_file, logits_of):
    """llama.cpp converts Mistral as "llama" with general.name "mistral"; transformers then builds a Mistral config
    but asks gguf for tensor names of a "mistral" architecture it does not define. qcore-gguf maps it as Llama."""
    model = qcore.from_pretrained(gguf_file("mistral", "F32"), dtype=torch.float32)
    assert type(model).__name__ == "MistralForCausalLM"
    assert torch.equal(logits_of(model), logits_of(hf_model("mistral")))


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
def test_kernels_in_bfloat16_stay_within_rounding(gguf_file, transformers_load, logits_of, type_name):
    path = gguf_file("llama", type_name)
    model = qcore.from_pretrained(path, dtype=torch.bfloat16)
    # Q6_K's groups of 16 fit no int kernel of torch's: its int8 codes dequantize per forward.
    kernel = "dequantize" if type_name == "Q6_K" else "int4pack-cpu"
    assert model.model.layers[0].self_attn.q_proj.packed.kernel == kernel
    assert qcore.kernels.KERNELS[kernel] in model.qcore_kernels["qcore-gguf"]
    in_bfloat16 = logits_of(transformers_load(path, torch.bfloat16))
    if kernel == "dequantize":  # the weights transformers' bfloat16 load holds, made in each forward
        assert torch.equal(logits_of(model), in_bfloat16)
        return
    reference = logits_of(transformers_load(path))
    own_rounding = relative(in_bfloat16, reference)
    error = relative(logits_of(model), reference)
    assert error <= 0.02 and error <= 2 * own_rounding


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K"])
def test_linear_weights_and_the_table_stay_quantized_and_the_rest_is_dequantized(
    gguf_file, transformers_load, type_name
):
    path = gguf_file("llama", type_name)
    model = qcore.from_pretrained(path, dtype=torch.float32)
    reference = transformers_load(path)
    for layer in gguf_layers(model):
        side = layer.side.numel() if layer.side is not None else 0
        held = layer.packed.nbytes + side if layer.packed is not None else layer.weight.numel()
        file_bytes = blocks.row_bytes(type_name, layer.in_features) * layer.out_features
        # Blocks are kept as stored; a kernel-layer weight holds its codes, float statistics (Q4_1's fp16 scale and
        # float32 zero; Q4_K's float32 scale and zero beside its block side) and, selected, the kernel's copy.
        assert (
            held == file_bytes if layer.packed is None else held <= {"Q4_1": 1.35, "Q4_K": 1.45}[type_name] * file_bytes
        )
    # An untied table keeps the file's blocks, byte for byte; a lookup decodes only its rows, to transformers' values.
    from qcore_gguf.layers import GgufEmbedding

    table = model.model.embed_tokens
    stored = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert isinstance(table, GgufEmbedding) and table.packed is None and not table.ties_a_head
    assert np.array_equal(table.weight.numpy(), stored.data)
    ids = torch.arange(table.num_embeddings).reshape(-1, 16)
    assert torch.equal(table(ids), reference.model.embed_tokens(ids))
    assert torch.equal(model.model.norm.weight, reference.model.norm.weight)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K"])
def test_save_keeps_the_blocks_and_reloads_without_the_gguf(gguf_file, logits_of, tmp_path, type_name):
    from safetensors.torch import load_file

    source = tmp_path / "source"
    source.mkdir()
    path = shutil.copy(gguf_file("llama", type_name), source / "model.gguf")
    model = qcore.from_pretrained(path, dtype=torch.bfloat16)
    expected = logits_of(model)
    qcore.save_pretrained(model, tmp_path / "saved")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    del model
    (source / "model.gguf").unlink()

    saved = load_file(tmp_path / "saved" / "model.safetensors")
    down = saved["model.layers.1.mlp.down_proj.weight"]
    assert down.dtype == torch.uint8 and saved["model.layers.1.mlp.down_proj.weight_type"] == blocks.ID[type_name]
    assert np.array_equal(down.numpy(), stored["blk.1.ffn_down.weight"].data)
    q_rows = torch.from_numpy(stored["blk.0.attn_q.weight"].data.copy())
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], blocks.unpermute_rows(q_rows, 4))

    reloaded = qcore.from_pretrained(tmp_path / "saved")
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(logits_of(reloaded), expected)


def test_dequantize_gives_transformers_weights(gguf_file, transformers_load):
    path = gguf_file("gpt2", "Q4_1")
    model = qcore.from_pretrained(path, dtype=torch.float32)
    reference = transformers_load(path)
    dense = qcore.dequantize(model)
    attention = dense.transformer.h[0].attn.c_attn
    assert type(attention).__name__ == "Conv1D" and not gguf_layers(dense)
    assert torch.equal(attention.weight, reference.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(attention.bias, reference.transformer.h[0].attn.c_attn.bias)


def test_convert_to_another_method_is_that_method_on_the_gguf_values(gguf_file, transformers_load, logits_of, tmp_path):
    from qcore.convert import convert

    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    path = gguf_file("llama", "Q8_0")
    converted = convert(path, tmp_path / "nf4", nf4)
    reloaded = qcore.from_pretrained(tmp_path / "nf4")
    assert reloaded.quantization_method == "bitsandbytes"
    assert torch.equal(logits_of(reloaded), logits_of(converted))
    # The same as quantizing transformers' dequantized load of the file to nf4 directly. (transformers refuses to
    # save a model it loaded from GGUF, so its tensors and config are written here.)
    from safetensors.torch import save_file

    reference = transformers_load(path)
    (tmp_path / "dense").mkdir()
    tied = set(reference.all_tied_weights_keys or {})
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k not in tied}
    save_file(state, tmp_path / "dense" / "model.safetensors", metadata={"format": "pt"})
    if hasattr(reference.config, "quantization_config"):
        del reference.config.quantization_config
    reference.config.architectures = [type(reference).__name__]
    reference.config.save_pretrained(tmp_path / "dense")
    direct = qcore.from_pretrained(tmp_path / "dense", nf4, dtype=torch.float32)
    assert torch.equal(logits_of(reloaded), logits_of(direct))


def test_directory_with_one_file_several_files_and_gguf_file(gguf_file, logits_of, tmp_path):
    shutil.copy(gguf_file("llama", "Q4_K"), tmp_path / "a.gguf")
    expected = logits_of(qcore.from_pretrained(tmp_path, dtype=torch.float32))
    shutil.copy(gguf_file("qwen2", "Q8_0"), tmp_path / "b.gguf")
    with pytest.raises(qcore.CheckpointError, match="gguf_file"):
        qcore.from_pretrained(tmp_path)
    assert torch.equal(logits_of(qcore.from_pretrained(tmp_path, gguf_file="a.gguf", dtype=torch.float32)), expected)
    assert type(qcore.from_pretrained(tmp_path, gguf_file="b.gguf")).__name__ == "Qwen2ForCausalLM"


def test_hub_id_downloads_only_the_named_file(gguf_file, logits_of, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-gguf" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(gguf_file("llama", "Q4_K"), snapshot / "tiny-Q4_K.gguf")
    shutil.copy(gguf_file("llama", "Q8_0"), snapshot / "tiny-Q8_0.gguf")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fetched = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, name, **k: fetched.append(name) or real(repo, name, **k)
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("fetched the whole repo"))

    model = qcore.from_pretrained("tiny-org/tiny-gguf", gguf_file="tiny-Q4_K.gguf", dtype=torch.float32)
    assert fetched == ["tiny-Q4_K.gguf"]
    assert torch.equal(
        logits_of(model), logits_of(qcore.from_pretrained(snapshot / "tiny-Q4_K.gguf", dtype=torch.float32))
    )


def test_generates_with_the_tokenizer_the_file_carries(gguf_file):
    from transformers import AutoTokenizer

    path = gguf_file("qwen2", "Q4_0")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = qcore.from_pretrained(path)
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert isinstance(tokenizer.decode(out[0]), str)


def test_plain_modules_are_not_gguf_layers(gguf_file):
    model = qcore.from_pretrained(gguf_file("gemma2", "Q4_0"))
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the file


@pytest.mark.parametrize("type_name", TIED_KERNEL_TYPES)
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_a_tied_embedding_stays_quantized_once_and_its_head_runs_on_the_kernel(
    gguf_file, transformers_load, logits_of, tmp_path, arch, type_name
):
    from qcore_gguf.layers import GgufEmbedding
    from safetensors.torch import load_file

    path = gguf_file(arch, type_name)
    reference = transformers_load(path)
    for dtype in (torch.float32, torch.bfloat16):
        model = qcore.from_pretrained(path, dtype=dtype)
        table, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert isinstance(table, GgufEmbedding) and type(head) is GgufLinear
        assert head.packed is table.packed is not None  # one copy of the table, on the kernel layer
        file_bytes = blocks.row_bytes(type_name, table.embedding_dim) * table.num_embeddings
        assert table.packed.nbytes <= 1.35 * file_bytes
        assert table.packed.kernel == ("int4pack-cpu" if dtype == torch.bfloat16 else "dequantize")
        ids = torch.arange(table.num_embeddings).reshape(-1, 16)  # every row, through the kernel layout
        assert torch.equal(table(ids), reference.get_input_embeddings()(ids).to(dtype))
    if type_name != "Q4_1":  # Q4_1's d * q + m, rewritten for the kernel, moves weights by float rounding
        assert torch.equal(table.packed.dequantize(), reference.get_output_embeddings().weight)
    assert_matches(logits_of(qcore.from_pretrained(path, dtype=torch.float32)), logits_of(reference), type_name)

    expected = logits_of(model)  # bfloat16, the int4 kernel
    qcore.save_pretrained(model, tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    embedding_name = next(name for name, module in model.named_modules() if module is table)
    assert saved[f"{embedding_name}.weight"].dtype == torch.uint8
    assert not [key for key in saved if key.startswith("lm_head.")]  # the head is the table, saved once
    stored = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert np.array_equal(saved[f"{embedding_name}.weight"].numpy(), stored.data)
    reloaded = qcore.from_pretrained(tmp_path / "saved")
    assert reloaded.get_output_embeddings().packed is reloaded.get_input_embeddings().packed
    assert torch.equal(logits_of(reloaded), expected)

    dense = qcore.dequantize(qcore.from_pretrained(path, dtype=torch.float32))
    assert type(dense.get_input_embeddings()) is nn.Embedding and type(dense.get_output_embeddings()) is nn.Linear
    assert dense.get_output_embeddings().weight is dense.get_input_embeddings().weight  # tied again
    assert torch.equal(dense.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    assert torch.equal(logits_of(dense), logits_of(reference))


def test_a_tied_table_s_file_pages_are_given_back_before_it_is_repacked(gguf_file, monkeypatch):
    """Its blocks were copied into codes: the mapped bytes need not stay resident beside the repack (a load's peak)."""
    from qcore.kernels import PackedWeight
    from qcore_gguf.reader import GgufReader

    events = []
    release, select = GgufReader.release, PackedWeight.select
    monkeypatch.setattr(
        GgufReader, "release", lambda self, name: events.append(("release", name)) or release(self, name)
    )
    monkeypatch.setattr(
        PackedWeight,
        "select",
        lambda self, *a, **k: events.append(("select", self.out_features)) or select(self, *a, **k),
    )
    model = qcore.from_pretrained(gguf_file("qwen3", "Q8_0"), dtype=torch.bfloat16)
    table = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is table) + ".weight"
    assert events.index(("release", name)) < events.index(("select", table.num_embeddings))


def test_a_tied_table_in_a_type_without_kernel_stays_a_plain_embedding(gguf_file, transformers_load):
    """A Q4_K (or Q6_K) table's head would decode the whole table in each forward: it is dequantized once."""
    model = qcore.from_pretrained(gguf_file("qwen3", "Q4_K"), dtype=torch.float32)
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


_SOURCE_CHANGE = """
import os, sys, torch, qcore
path, change, mapped = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = qcore.from_pretrained(path, mmap_weights=mapped)
ids = torch.tensor([[1, 5, 9, 17, 33]])
with torch.no_grad():
    before = model(ids).logits.clone()
    if change == "rewrite":  # every byte after the header changed in place, the size kept
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.seek(size // 2)
            handle.write(bytes(size - size // 2))
    else:
        os.truncate(path, 64)
    print("same" if torch.equal(before, model(ids).logits) else "changed", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["Q4_K", "Q4_0", "F16"])
def test_a_loaded_model_holds_its_own_blocks_unless_mapped(gguf_file, tmp_path, type_name):
    """Blocks kept as stored (every type without a kernel, and plain tensors) are the model's own copy by default, so
    a file changed or truncated after the load changes nothing; ``mmap_weights=True`` keeps views, as documented."""
    import shutil
    import signal
    import subprocess
    import sys

    def run(change: str, mapped: bool) -> subprocess.CompletedProcess:
        path = shutil.copy(gguf_file("llama", type_name), tmp_path / f"{change}-{int(mapped)}.gguf")
        command = [sys.executable, "-c", _SOURCE_CHANGE, str(path), change, "1" if mapped else "0"]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    for change in ("rewrite", "truncate"):
        done = run(change, mapped=False)
        assert done.returncode == 0 and done.stdout.split() == ["same"], (change, done.returncode, done.stderr[-800:])
    if type_name != "Q4_0":  # Q4_0 becomes kernel codes either way; blocks kept as stored are views when mapped
        assert run("rewrite", mapped=True).stdout.split() == ["changed"]
        assert run("truncate", mapped=True).returncode == -signal.SIGBUS


def test_kernel_types_chooses_the_block_types_that_run_on_the_kernels(gguf_file, logits_of, tmp_path):
    """A loading attribute: Q5_0 on the kernels by default (int8 codes, 1.9x its blocks' bytes, many times faster
    than dequantizing every forward), kept as blocks when left out; never saved, so a reload chooses again."""
    path = gguf_file("llama", "Q5_0")
    fast = qcore.from_pretrained(path, dtype=torch.float32)
    kept = qcore.from_pretrained(path, {"quant_method": "gguf", "kernel_types": ["Q4_0"]}, dtype=torch.float32)
    assert all(layer.packed is not None for layer in gguf_layers(fast))
    assert all(layer.packed is None for layer in gguf_layers(kept))
    assert torch.equal(logits_of(fast), logits_of(kept))  # Q5_0's int8 codes times d: the same float32 weights
    qcore.save_pretrained(kept, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert "kernel_types" not in saved
    reloaded = qcore.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert all(layer.packed is not None for layer in gguf_layers(reloaded))
    assert torch.equal(logits_of(reloaded), logits_of(kept))
    with pytest.raises(qcore.ConfigError, match="kernel_types"):
        qcore.from_pretrained(path, {"quant_method": "gguf", "kernel_types": ["Q2_K"]})


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_size_estimate_is_what_a_kernel_layer_weight_holds(gguf_file, type_name, dtype):
    """``quantized_nbytes`` (the memory guard, ``qcore estimate``, device_map="auto") counts the kernel layer's
    codes and statistics, more than the blocks for most of these types, not the file's bytes."""
    from qcore_gguf.config import GgufConfig

    model = qcore.from_pretrained(gguf_file("llama", type_name), dtype=dtype)
    for layer in gguf_layers(model):
        held = layer.packed.nbytes + (layer.side.numel() if layer.side is not None else 0)
        estimate = GgufConfig(weight_type=type_name).quantized_nbytes(
            layer.out_features, layer.in_features, dtype.itemsize
        )
        assert held == estimate - 1  # and the one-byte weight_type
