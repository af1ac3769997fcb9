"""vLLM's offline ``LLM`` runs a checkpoint qcore wrote and produces qcore's own greedy tokens. Needs CUDA and vLLM
(skipped without either; run it where a GPU is available).

The tiny model's ``lm_head`` is scaled up 16 times before quantizing, so each greedy choice wins by a wide margin
and the two engines' different int4 kernels (vLLM's Marlin, torch's tinygemm) cannot flip a near tie.
"""

from __future__ import annotations

import pytest
import qcore
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.vllm]

PROMPT = [1, 5, 9, 17, 33, 65, 129, 3]
TOKENS = 16


@pytest.fixture(scope="module")
def vllm():
    module = pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    return module


@pytest.fixture(scope="module")
def written(tmp_path_factory, one_group) -> tuple:
    from qcore.testing import build
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("ct-vllm")
    base = build(
        "llama",
        root / "base",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1024,
        max_position_embeddings=256,
    )
    tensors = load_file(base / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 16
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group"}
    model = qcore.from_pretrained(base, one_group(weights), dtype=torch.bfloat16, device_map="cuda:0")
    qcore.save_pretrained(model, root / "w4a16")
    return model, root / "w4a16"


def test_vllm_generates_qcores_greedy_tokens(vllm, written):
    model, directory = written
    with torch.no_grad():
        ours = model.generate(
            torch.tensor([PROMPT], device="cuda"), max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS
        )[0, len(PROMPT) :].tolist()
    llm = vllm.LLM(
        model=str(directory),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=128,
    )
    params = vllm.SamplingParams(temperature=0, max_tokens=TOKENS, min_tokens=TOKENS, detokenize=False)
    theirs = list(llm.generate([{"prompt_token_ids": PROMPT}], params)[0].outputs[0].token_ids)
    assert theirs == ours
