"""CONTRIBUTING.md's "Adding a backend" checklist, run as written: its ```bash blocks, in order, in one shell.

The commands run in a scratch directory with a scratch virtual environment layered over this one: it sees everything
installed here (qcore, torch, the library), while ``pip install -e .`` installs the generated package into the
scratch environment only, so the run leaves this environment as it found it. pip runs offline. The generated package
is found only through its installed entry point, as a user's would be.

One run serves tests/test_contributing.py (the checklist works) and tests/test_template.py (what the template
generates); the ``checklist_run`` fixture in conftest.py makes it once per session.
"""

from __future__ import annotations

import dataclasses
import os
import re
import site
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parent.parent
CONTRIBUTING = ROOT / "CONTRIBUTING.md"

#: The values the checklist's NAME and LIBRARY placeholders take. A hyphenated name exercises every spelling the
#: template derives from it (distribution, package, entry point, class names).
NAME = "template-check"
#: Pure Python, always installed (qcore needs it), and importable under its own name: the conformance suite can hide
#: it to check the missing-library error.
LIBRARY = "packaging"


@dataclasses.dataclass
class ChecklistRun:
    """What running the checklist did."""

    #: The shell commands, placeholders filled, in the order they ran.
    commands: list[str]
    returncode: int
    #: stdout and stderr together; the shell traces each command as ``+ command``.
    output: str
    #: The directory the commands ended in: the generated package.
    package: Path
    #: The scratch environment's interpreter, which sees the package through its entry point.
    python: Path

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def pytest_summaries(self) -> list[str]:
        """The closing line of each pytest run, e.g. ``9 passed, 14 warnings``, in order."""
        return re.findall(r"^=+ (.+?) in [\d.]+s(?: \([^)]*\))? =+$", self.output, flags=re.M)


def checklist_section() -> str:
    return CONTRIBUTING.read_text().split("## Adding a backend\n", 1)[1].split("\n## ", 1)[0]


def checklist_commands() -> list[str]:
    """Every line of every ```bash block of the checklist, with ``NAME`` and ``LIBRARY`` filled in."""
    blocks = re.findall(r"^( *)```bash\n(.*?)^\1```", checklist_section(), flags=re.M | re.S)
    lines = [line for _, block in blocks for line in textwrap.dedent(block).splitlines() if line.strip()]
    return [line.replace("NAME", NAME).replace("LIBRARY", LIBRARY) for line in lines]


def run(scratch: Path) -> ChecklistRun:
    """Run the checklist's commands in ``scratch/work``, with a virtual environment in ``scratch/venv``."""
    python = _scratch_environment(scratch / "venv")
    work = scratch / "work"
    work.mkdir()
    ended_in = scratch / "ended-in"
    commands = checklist_commands()
    script = "\n".join(["set -euxo pipefail", *commands, f'pwd > "{ended_in}"'])
    env = {key: value for key, value in os.environ.items() if not key.startswith(("QCORE_", "PYTEST_"))}
    env.update(
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(python.parent.parent),
        # Offline: everything the package depends on is installed already.
        PIP_NO_INDEX="1",
        # pip reads this switch inverted: "0" turns build isolation off, so setuptools comes from this environment
        # rather than from an index.
        PIP_NO_BUILD_ISOLATION="0",
        PIP_CACHE_DIR=str(scratch / "pip-cache"),
    )
    completed = subprocess.run(
        ["bash", "-c", script], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600,
    )  # fmt: skip
    package = Path(ended_in.read_text().strip()) if ended_in.exists() else work
    return ChecklistRun(commands, completed.returncode, completed.stdout, package, python)


def _scratch_environment(venv: Path) -> Path:
    """A virtual environment that also sees this one's packages; returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # addsitedir, not a plain path: this environment's .pth files (editable installs such as qcore's) must run too.
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    Path(purelib, "layered-over-parent.pth").write_text(
        "".join(f"import site; site.addsitedir({directory!r})\n" for directory in ours if os.path.isdir(directory))
    )
    # qcore is importable but its console script lives in this environment's bin: give the scratch one its own.
    script = venv / "bin" / "qcore"
    script.write_text(f"#!{python}\nfrom qcore.cli import main\n\nmain()\n")
    script.chmod(0o755)
    return python
