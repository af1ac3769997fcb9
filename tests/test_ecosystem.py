"""qcore models in the ecosystem: QLoRA through PEFT (train, save the adapter, reload), and the attributes
transformers, PEFT and Trainer look for on a quantized model."""

from __future__ import annotations

import pytest
import qcore
import torch
from tiny_models import logits

BACKENDS = {
    "bnb-nf4": ("qcore_bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                              "bnb_4bit_compute_dtype": "float32"}),
    "hqq-4bit": ("qcore_hqq", {"quant_method": "hqq", "nbits": 4, "group_size": 64}),
}  # fmt: skip


def quantized(path, name):
    module, config = BACKENDS[name]
    pytest.importorskip(module, reason=f"{name} needs {module}")
    return qcore.from_pretrained(path, config, dtype=torch.float32)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_qlora_trains_saves_the_adapter_and_reloads_with_the_same_outputs(llama, tmp_path, name):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(quantized(llama, name), use_gradient_checkpointing=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    peft_model.train()
    for _ in range(6):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    peft_model.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # the adapter alone

    peft_model.eval()
    expected = logits(peft_model)
    reloaded = PeftModel.from_pretrained(quantized(llama, name), tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded), expected)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_model_carries_what_the_ecosystem_checks(llama, name):
    model = quantized(llama, name)
    assert model.is_quantized and model.hf_quantizer.is_trainable and model.hf_quantizer.is_serializable()
    assert model.quantization_method == BACKENDS[name][1]["quant_method"]
    assert model.config.quantization_config["quant_method"] == BACKENDS[name][1]["quant_method"]
    full = qcore.from_pretrained(llama, dtype=torch.float32)
    assert model.get_memory_footprint() < full.get_memory_footprint()
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)


def test_text_generation_pipeline_runs_on_a_quantized_model(llama, toy):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {f"w{i}": i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1", pad_token="w0")
    model = qcore.from_pretrained(llama, {"quant_method": "toy_int8"})
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generate("w5 w6 w7", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("w5 w6 w7")
