"""The checkpoint changing under a loaded model: rewritten in place, truncated, or saved over.

By default the loaded model holds its own copy of every tensor it keeps as stored, so none of these changes its
outputs or crashes it. With ``mmap_weights=True`` it holds views of the file, and the documented trade-off shows:
an in-place rewrite changes its outputs and a truncation kills the process with SIGBUS. Each scenario runs in a
child process, so a SIGBUS fails the test instead of killing the test run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

_SCENARIO = textwrap.dedent(
    """
    import os, shutil, sys
    from pathlib import Path

    import torch
    import qcore
    from safetensors.torch import load_file, save_file

    IDS = torch.tensor([[1, 5, 9, 17, 33]])


    def scenario(source, change, mapped):
        model = qcore.from_pretrained(source, mmap_weights=mapped)
        with torch.no_grad():
            before = model(IDS).logits.clone()
        weights = source / "model.safetensors"
        if change == "rewrite":  # same file, same size, every data byte changed in place
            size, header = weights.stat().st_size, int.from_bytes(weights.read_bytes()[:8], "little")
            with weights.open("r+b") as handle:
                handle.seek(8 + header)
                handle.write(b"\\x7f" * (size - 8 - header))
        elif change == "truncate":
            os.truncate(weights, 8)
        elif change == "save_file":  # a writer that truncates and rewrites the same file (safetensors' own does)
            tensors = load_file(weights)
            save_file({name: torch.zeros_like(t) for name, t in tensors.items()}, weights, metadata={"format": "pt"})
        elif change == "save_pretrained":
            qcore.save_pretrained(qcore.from_pretrained(source, {"quant_method": "eetq"}), source, overwrite=True)
        with torch.no_grad():
            after = model(IDS).logits
        return "same" if torch.equal(before, after) else "changed"


    original, mapped = Path(sys.argv[1]), sys.argv[3] == "1"
    for number, change in enumerate(sys.argv[2].split(",")):
        source = original.with_name(f"{original.name}-{number}")
        shutil.copytree(original, source)
        print(change, scenario(source, change, mapped), flush=True)
    """
)


def _run(checkpoint, tmp_path, changes: list[str], mapped: bool) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _SCENARIO, str(checkpoint), ",".join(changes), "1" if mapped else "0"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_a_loaded_model_is_unaffected_by_its_checkpoint_changing(llama, tmp_path):
    source = shutil.copytree(llama, tmp_path / "source")
    changes = ["rewrite", "truncate", "save_file", "save_pretrained"]
    run = _run(source, tmp_path, changes, mapped=False)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.splitlines()[-len(changes) :] == [f"{change} same" for change in changes]


@pytest.mark.slow
def test_mapped_weights_see_an_in_place_rewrite_and_die_of_a_truncation(llama, tmp_path):
    source = shutil.copytree(llama, tmp_path / "source")
    run = _run(source, tmp_path, ["rewrite", "truncate"], mapped=True)
    assert run.stdout.splitlines()[-1] == "rewrite changed"
    assert run.returncode == -signal.SIGBUS
