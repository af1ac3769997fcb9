"""Print the one command of a README.md section's ```bash block: ``install`` (## Install) or ``test`` (## Test).

.ci/run runs what this prints, so CI runs the README's commands exactly, plugins added to the install line included.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = {"install": "Install", "test": "Test"}


def command(section: str) -> str:
    """The single line of the first ```bash block under ``## <heading>``; anything else is an error."""
    heading = SECTIONS[section]
    parts = README.read_text().split(f"\n## {heading}\n", 1)
    if len(parts) != 2:
        raise SystemExit(f"README.md has no '## {heading}' section")
    block = re.search(r"```bash\n(.*?)\n```", parts[1].split("\n## ", 1)[0], flags=re.S)
    lines = [line for line in (block.group(1).splitlines() if block else []) if line.strip()]
    if len(lines) != 1:
        raise SystemExit(f"README.md's '## {heading}' section must hold one ```bash block of one command")
    return lines[0].strip()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SECTIONS:
        raise SystemExit(f"usage: python .ci/readme_command.py {{{','.join(SECTIONS)}}}")
    print(command(sys.argv[1]))
