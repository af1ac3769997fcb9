"""PEFT accepts a qcore-bnb model as it accepts transformers' own: prepare_model_for_kbit_training and
get_peft_model wrap the bitsandbytes layers with PEFT's bnb LoRA layers, and a training step gives the same loss."""

from __future__ import annotations

import pytest
import qcore
import torch


def lora_losses(model, steps: int = 2) -> tuple[list[torch.Tensor], type]:
    """Losses of ``steps`` SGD steps of a LoRA adapter on q_proj/v_proj, and the class PEFT wrapped q_proj in."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    wrapped = type(peft_model.base_model.model.model.layers[0].self_attn.q_proj)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    input_ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, wrapped


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_lora_trains_on_a_qcore_model_as_on_transformers(checkpoints, method, bnb_dict, reference_model):
    from peft.tuners.lora import bnb as lora_bnb

    losses, wrapped = lora_losses(qcore.from_pretrained(checkpoints["llama"], bnb_dict(method), dtype=torch.float32))
    expected, _ = lora_losses(reference_model(checkpoints["llama"], method, torch.float32))

    assert wrapped is (lora_bnb.Linear8bitLt if method == "int8" else lora_bnb.Linear4bit)
    assert losses[1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(losses, expected, strict=True))
