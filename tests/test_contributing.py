"""CONTRIBUTING.md's "Adding a backend" checklist, followed literally: every command of its ```bash blocks runs, in
order, in one shell, on a freshly generated backend (``NAME`` and ``LIBRARY`` filled in; see checklist.py), and the
conformance run it ends with passes. The run is the session fixture ``checklist_run``, shared with test_template.py.
"""

from __future__ import annotations

import re
import zipfile

import checklist
import pytest
from qcore.testing import BackendConformance

PACKAGE = "qcore_" + checklist.NAME.replace("-", "_")


def test_steps_are_numbered_in_order_and_every_command_belongs_to_one():
    section = checklist.checklist_section()
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", section, flags=re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 5
    # A block indented under an item belongs to that step; one at the margin would end the list.
    assert re.findall(r"^( *)```bash", section, flags=re.M) and not re.search(r"^```bash", section, flags=re.M)


def test_commands_take_a_backend_from_the_template_to_a_conformance_run():
    commands = checklist.checklist_commands()
    assert commands[0].startswith(f"qcore new-backend {checklist.NAME} --library {checklist.LIBRARY}")
    steps = ["qcore new-backend", "python -m pip install -e .", "python -m pytest", "python -m pip wheel"]
    positions = [next(i for i, command in enumerate(commands) if command.startswith(step)) for step in steps]
    assert positions == sorted(positions), commands


@pytest.mark.slow
def test_every_command_succeeds(checklist_run):
    assert checklist_run.returncode == 0, checklist_run.tail()


@pytest.mark.slow
def test_the_conformance_run_passes(checklist_run):
    summaries = checklist_run.pytest_summaries()
    assert summaries, checklist_run.tail()
    assert summaries[-1].startswith(f"{len(BackendConformance._STANDARD)} passed"), summaries[-1]
    assert not any(word in summaries[-1] for word in ("failed", "error", "skipped", "xfail")), summaries[-1]


@pytest.mark.slow
def test_the_publish_step_builds_a_wheel_with_the_entry_point(checklist_run):
    (wheel,) = (checklist_run.package / "dist").glob(f"{PACKAGE}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert f"[qcore]\n{checklist.NAME} = {PACKAGE}.plugin" in archive.read(entry_points).decode()
    assert {f"{PACKAGE}/{module}.py" for module in ("__init__", "plugin", "config", "layers")} <= names
