"""The file the README's examples name, for the repository's README test (tests/test_readme_examples.py): a tiny
Llama in Q4_0 with a byte-level vocabulary, written as llama.cpp writes it, as ``gguf_path``."""

from __future__ import annotations

import sys
from pathlib import Path


def fixtures(directory: Path, path: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_files import write

    directory.mkdir(parents=True, exist_ok=True)
    return {"gguf_path": write("llama", "Q4_0", directory / "model.gguf")}
