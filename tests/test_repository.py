"""Repository invariants: CI runs exactly the README's commands; each plugin has the same shape."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def readme_block(heading: str) -> str:
    section = ROOT.joinpath("README.md").read_text().split(f"## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1).strip()


@pytest.mark.parametrize("heading", ["Install", "Test"])
def test_ci_runs_the_readme_commands_verbatim(heading):
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert readme_block(heading) in ci.splitlines()


@pytest.mark.parametrize("plugin", sorted(p.name for p in (ROOT / "plugins").iterdir() if p.is_dir()))
def test_every_plugin_has_the_same_shape(plugin):
    directory = ROOT / "plugins" / plugin
    package = plugin.replace("-", "_")
    for path in ("pyproject.toml", "README.md", f"src/{package}/__init__.py", f"src/{package}/plugin.py", "tests"):
        assert (directory / path).exists(), f"{plugin} lacks {path}"
    assert f'name = "{plugin}"' in (directory / "pyproject.toml").read_text()
    assert "[project.entry-points.qcore]" in (directory / "pyproject.toml").read_text()
