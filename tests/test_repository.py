"""Repository invariants: CI runs exactly the README's commands, on every plugin; each plugin has the same shape."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PLUGINS = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())
DISTRIBUTIONS = [ROOT / "core", *(ROOT / "plugins" / name for name in PLUGINS)]


def readme_block(heading: str) -> str:
    section = ROOT.joinpath("README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).strip()


@pytest.mark.parametrize(("section", "heading"), [("install", "Install"), ("test", "Test")])
def test_ci_reads_the_readme_commands_verbatim(section, heading):
    printed = subprocess.run(
        [sys.executable, ROOT / ".ci" / "readme_command.py", section], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == readme_block(heading)
    assert "\n" not in printed


def test_ci_runs_the_readme_install_and_test_commands_in_both_passes():
    ci = ROOT.joinpath(".ci", "run").read_text()
    install, test = readme_block("Install"), readme_block("Test")
    newest, lowest = ci.split("pass 2 of 2", 1)
    assert f"\n{install}\n" in newest and f"\n{test}\n" in newest
    # The lowest pass installs the same distributions as the README, resolved to their lower bounds.
    targets = install.removeprefix("python -m pip install ")
    assert f"--resolution lowest-direct torch==2.13.0 {targets}\n" in lowest
    # It runs the same test command, leaving out only the tests marked slow (they have run in the newest pass).
    assert f'\n    {test} -m "not slow"\n' in lowest
    assert install.startswith("python -m pip install ")


def test_the_readme_install_command_installs_the_core_and_every_plugin():
    words = readme_block("Install").split()
    assert '"./core[test]"' in words
    assert sorted(w.removeprefix("./plugins/") for w in words if w.startswith("./plugins/")) == PLUGINS


@pytest.mark.parametrize("plugin", PLUGINS)
def test_every_plugin_has_the_same_shape(plugin):
    directory = ROOT / "plugins" / plugin
    package = plugin.replace("-", "_")
    for path in ("pyproject.toml", "README.md", f"src/{package}/__init__.py", f"src/{package}/plugin.py", "tests"):
        assert (directory / path).exists(), f"{plugin} lacks {path}"
    assert f'name = "{plugin}"' in (directory / "pyproject.toml").read_text()
    assert "[project.entry-points.qcore]" in (directory / "pyproject.toml").read_text()


@pytest.mark.parametrize("distribution", DISTRIBUTIONS, ids=lambda path: path.name)
def test_every_readme_states_the_versions_it_was_tested_with(distribution):
    """Each distribution's README names the releases its tests last passed on, for every dependency but qcore."""
    from packaging.requirements import Requirement

    # The [project] dependencies list of our own pyproject.toml files (tomllib is Python 3.11+; qcore supports 3.10).
    listed = re.search(r"^dependencies = \[(.*?)^\]", (distribution / "pyproject.toml").read_text(), re.M | re.S)
    names = {Requirement(r).name.lower() for r in re.findall(r'"([^"]+)"', listed.group(1))} - {"qcore"}
    readme = (distribution / "README.md").read_text()
    assert "## Tested with" in readme, f"{distribution.name}/README.md has no '## Tested with' section"
    section = readme.split("## Tested with", 1)[1].split("\n## ", 1)[0]
    stated = {m.group(1).lower().replace("_", "-") for m in re.finditer(r"`([A-Za-z0-9_.-]+) [0-9][^`]*`", section)}
    missing = {name.replace("_", "-") for name in names} - stated
    assert not missing, f"{distribution.name}/README.md's 'Tested with' does not name {sorted(missing)}"
