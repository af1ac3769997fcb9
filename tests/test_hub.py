"""Hub ids resolve through huggingface_hub from a pre-populated local cache, with the hub offline."""

from __future__ import annotations

import shutil

import huggingface_hub
import pytest
import qcore
import torch
from huggingface_hub import constants
from tiny_models import logits

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(llama, tmp_path, monkeypatch):
    """A hub cache holding ``tiny-org/tiny-llama`` (as huggingface_hub lays it out), and no network."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(llama, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_hub_id_loads_from_the_offline_cache(offline_hub, toy):
    model = qcore.from_pretrained("tiny-org/tiny-llama", {"quant_method": "toy_int8"})
    local = qcore.from_pretrained(offline_hub, {"quant_method": "toy_int8"})
    assert torch.equal(logits(model), logits(local))


def test_validation_runs_before_any_weight_file_is_fetched(offline_hub, monkeypatch):
    fetched = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: fetched.append(a) or real(*a, **k))
    with pytest.raises(qcore.ConfigError, match="unknown quant_method"):
        qcore.from_pretrained("tiny-org/tiny-llama", {"quant_method": "no_such_method"})
    assert fetched == []


def test_unknown_hub_id_offline_names_the_id_and_the_fix(offline_hub):
    with pytest.raises(qcore.CheckpointError, match="tiny-org/missing.*HF_HUB_OFFLINE"):
        qcore.from_pretrained("tiny-org/missing")
