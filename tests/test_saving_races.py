"""Saves racing other saves and other processes, and saves that run out of disk: nothing at the destination is lost.

Each race runs real processes. A save is held just before it commits (its files written and flushed) until the
test has changed the destination, so the race is hit every time rather than by luck.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import qcore
import torch
from safetensors.torch import load_file

#: A child process that saves a one-tensor model filled with FILL into DEST; with HOLD it writes READY once its
#: staging is flushed and waits for GO before committing. It prints "saved" or the CheckpointError.
_SAVER = textwrap.dedent(
    """
    import sys, time, types
    from pathlib import Path

    import torch
    import qcore
    from qcore import saving

    dest, fill, hold, overwrite = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    if hold != "-":
        flush = saving._flush

        def held(directory):
            flush(directory)
            Path(hold, "READY").write_text("")
            while not Path(hold, "GO").exists():
                time.sleep(0.01)

        saving._flush = held

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((64, 64), fill))
            self.config = types.SimpleNamespace(
                save_pretrained=lambda d: Path(d, "config.json").write_text("{}"), architectures=None
            )

    try:
        qcore.save_pretrained(Model(), dest, overwrite=overwrite)
        print("saved")
    except qcore.CheckpointError as error:
        print("refused:", error)
    """
)


def _start(dest: Path, fill: float, hold: Path | None = None, overwrite: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(dest), str(fill), str(hold or "-"), "1" if overwrite else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out.strip()


def _wait_ready(hold: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (hold / "READY").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the held save never got ready"
        time.sleep(0.02)


def _fill(directory: Path) -> float:
    return float(load_file(directory / "model.safetensors")["weight"][0, 0])


def _no_staging(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


@pytest.mark.slow
def test_two_saves_to_one_new_destination_keep_the_first_to_commit(tmp_path):
    dest, hold = tmp_path / "out", tmp_path / "hold"
    hold.mkdir()
    held = _start(dest, 1.0, hold)
    _wait_ready(hold, held)
    assert _finish(_start(dest, 2.0)) == "saved"  # the other save commits while the first is held
    (hold / "GO").write_text("")
    result = _finish(held)
    assert result.startswith("refused:") and "destination exists and is not empty" in result
    assert _fill(dest) == 2.0  # the committed checkpoint is whole and untouched
    _no_staging(tmp_path)


@pytest.mark.slow
def test_two_unsynchronised_saves_one_wins_whole(tmp_path):
    dest = tmp_path / "out"
    results = [_finish(p) for p in [_start(dest, 1.0), _start(dest, 2.0)]]
    assert sorted(r.split(":")[0] for r in results) in (["refused", "saved"], ["saved", "refused"])
    assert _fill(dest) == (1.0 if results[0] == "saved" else 2.0)
    _no_staging(tmp_path)


@pytest.mark.parametrize("contents", ["a file", "nothing"])
def test_a_directory_created_during_a_save_is_left_alone(tmp_path, contents):
    dest, hold = tmp_path / "out", tmp_path / "hold"
    hold.mkdir()
    held = _start(dest, 1.0, hold)
    _wait_ready(hold, held)
    dest.mkdir()  # another user or process makes the destination while the save runs
    if contents == "a file":
        (dest / "mine.txt").write_text("keep me")
    (hold / "GO").write_text("")
    assert _finish(held).startswith("refused:")
    assert sorted(p.name for p in dest.iterdir()) == (["mine.txt"] if contents == "a file" else [])
    _no_staging(tmp_path)


def test_the_empty_directory_made_for_the_save_is_used(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    assert _finish(_start(dest, 3.0)) == "saved"
    assert _fill(dest) == 3.0


@pytest.mark.slow
def test_overwrite_replaces_what_appeared_during_the_save(tmp_path):
    dest, hold = tmp_path / "out", tmp_path / "hold"
    hold.mkdir()
    held = _start(dest, 1.0, hold, overwrite=True)
    _wait_ready(hold, held)
    assert _finish(_start(dest, 2.0)) == "saved"
    (hold / "GO").write_text("")
    assert _finish(held) == "saved"
    assert _fill(dest) == 1.0
    _no_staging(tmp_path)


class _Tiny(torch.nn.Module):
    def __init__(self, numel: int = 64 * 64):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(numel))
        self.config = types.SimpleNamespace(
            save_pretrained=lambda d: Path(d, "config.json").write_text("{}"), architectures=None
        )


@pytest.mark.parametrize("size", ["1e400GB", "nan", float("inf"), -1, "5 parsecs"])
def test_an_impossible_max_shard_size_names_the_field(tmp_path, size):
    with pytest.raises(qcore.ConfigError, match="max_shard_size"):
        qcore.save_pretrained(_Tiny(), tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


_FULL_DISK = textwrap.dedent(
    """
    import sys, types
    from pathlib import Path
    import torch, qcore

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(256 * 1024))  # 1 MiB, on a 256 KiB file system
            self.config = types.SimpleNamespace(
                save_pretrained=lambda d: Path(d, "config.json").write_text("{}"), architectures=None
            )

    root = Path(sys.argv[1])
    (root / "old").mkdir()
    (root / "old" / "model.safetensors").write_text("the previous checkpoint")
    for dest, overwrite in ((root / "new", False), (root / "old", True)):
        try:
            qcore.save_pretrained(Model(), dest, overwrite=overwrite)
            print("saved")
        except qcore.CheckpointError as error:
            print("refused:", error)
    print(sorted(p.name for p in root.iterdir()))
    print((root / "old" / "model.safetensors").read_text())
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None or sys.platform != "linux", reason="needs Linux user namespaces")
def test_a_full_disk_names_the_path_and_changes_nothing(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK)
    # A real ENOSPC: a 256 KiB tmpfs mounted in a private mount namespace (no privileges needed).
    command = f"mount -t tmpfs -o size=256k none {mount} && {sys.executable} {script} {mount}"
    run = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=120)
    if run.returncode != 0 and "mount" in run.stderr and "saved" not in run.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stderr
    for line in lines[:2]:
        assert line.startswith("refused:") and "the disk is full" in line and str(mount) in line
    assert lines[2] == "['old']"  # no staging left behind, no new destination
    assert lines[3] == "the previous checkpoint"
