"""Every ```python block of the README runs as written, in order, in a directory holding a tiny ``model.gguf``
(a Llama in Q4_0 with a byte-level vocabulary, written as llama.cpp writes it)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(gguf_file, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5
    shutil.copy(gguf_file("llama", "Q4_0"), tmp_path / "model.gguf")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    assert (tmp_path / "model-qcore" / "model.safetensors").is_file()
    assert (tmp_path / "model-nf4" / "config.json").is_file()


def test_readme_documents_every_stored_tensor():
    text = README.read_text()
    for key in ("weight", "weight_type", "bias"):
        assert f"| `{key}` |" in text
