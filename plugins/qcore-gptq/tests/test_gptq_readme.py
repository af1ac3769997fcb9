"""Every ```python block of the plugin's README runs as written (in order, sharing one namespace, in a scratch
directory); blocks fenced ```python notest say in their text why they cannot run here."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no runnable python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "tiny-llama-gptq" / "config.json").is_file()
