"""Every ```python block of README.md and of each plugin's README.md runs as written, against a tiny model.

The blocks of one README run in order in one namespace, as a reader pastes them into one session, in a scratch
working directory (so ``"out/"`` lands there). A README names the user's model once, in a line ``path = "..."``
(a local directory or a hub id); here that line points ``path`` at a tiny Llama with a byte-level tokenizer built at
test time instead, and a block may also use ``path`` without setting it. A plugin whose examples need a file of
another kind (a ``.gguf`` file) names it the same way (``gguf_path = "model.gguf"``) and provides it from
``plugins/<name>/tests/readme_fixtures.py``: ``def fixtures(directory: Path, path: Path) -> dict[str, str]`` writes
its files under ``directory`` (``path`` is the tiny Llama) and returns name -> file. A block fenced
```` ```python notest ```` is not run, and the paragraph just above it, or a comment opening it, must say why (a
GPU, a download, another program). A plugin added under plugins/ is picked up with its README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
READMES = [ROOT / "README.md", *sorted((ROOT / "plugins").glob("*/README.md"))]
#: A line naming the user's file, ``name = "..."`` (optionally commented); the test substitutes its own.
NAME_LINE = r"""^({names}) = (["']).*\2 *(#.*)?$"""
PATH_LINE = re.compile(NAME_LINE.format(names="path"), flags=re.M)
#: Words that say why a block cannot run here; one must appear in the paragraph above a ``notest`` block.
REASONS = ("gpu", "cuda", "download", "network", "needs", "requires", "cannot", "not run", "because")


def blocks(readme: Path) -> list[tuple[int, str, bool, str]]:
    """(line, code, runs, why) for every ```python block of ``readme``; ``why`` is the paragraph just above it and
    the comment lines opening it."""
    text = readme.read_text()
    found = []
    for match in re.finditer(r"^```python( notest)?[^\n]*\n(.*?)^```$", text, flags=re.M | re.S):
        before = text[: match.start()].rstrip("\n").split("\n\n")[-1]
        code = match.group(2)
        opening = "\n".join(line for line in code.splitlines()[:3] if line.lstrip().startswith("#"))
        found.append((text.count("\n", 0, match.start()) + 1, code, match.group(1) is None, f"{before}\n{opening}"))
    return found


def plugin_fixtures(readme: Path, directory: Path, path: Path) -> dict[str, str]:
    """The files a plugin's ``tests/readme_fixtures.py`` provides for its README's examples, by variable name."""
    module_file = readme.parent / "tests" / "readme_fixtures.py"
    if not module_file.is_file():
        return {}
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"readme_fixtures_{readme.parent.name}", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: str(file) for name, file in module.fixtures(directory, path).items()}


def readme_id(readme: Path) -> str:
    return readme.relative_to(ROOT).as_posix()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    """A bf16 Llama whose widths every in-repo group and block size divides, with a tokenizer for any text."""
    from qcore.testing.models import add_byte_tokenizer, build

    directory = build("llama", tmp_path_factory.mktemp("readme") / "llama", hidden_size=128, intermediate_size=256)
    return add_byte_tokenizer(directory)


def test_the_readmes_have_python_examples():
    assert blocks(ROOT / "README.md"), "README.md lost its Python examples"
    assert all(readme.is_file() for readme in READMES)


@pytest.mark.parametrize("readme", [r for r in READMES if any(runs for _, _, runs, _ in blocks(r))], ids=readme_id)
def test_every_python_block_runs_as_written(readme, tiny_path, tmp_path, monkeypatch):
    runnable = [(line, code) for line, code, runs, _ in blocks(readme) if runs]
    monkeypatch.chdir(tmp_path)
    files = {"path": str(tiny_path), **plugin_fixtures(readme, tmp_path / "fixtures", tiny_path)}
    named = re.compile(NAME_LINE.format(names="|".join(map(re.escape, files))), flags=re.M)
    namespace: dict = {"__name__": "__readme__", **files}
    for line, code in runnable:
        source = named.sub(lambda m: f"{m.group(1)} = {files[m.group(1)]!r}", code)
        try:
            exec(compile(source, f"{readme_id(readme)}:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"the ```python block at {readme_id(readme)}:{line} fails: {type(error).__name__}: {error}")


@pytest.mark.parametrize("readme", READMES, ids=readme_id)
def test_a_block_left_out_says_why(readme):
    for line, _, runs, before in blocks(readme):
        if not runs:
            assert any(word in before.lower() for word in REASONS), (
                f"{readme_id(readme)}:{line} is fenced 'python notest'; say in the paragraph just above it why it "
                f"cannot run in the tests (it needs a GPU, a download, ...)"
            )


def test_the_path_line_is_recognised_and_nothing_else():
    assert PATH_LINE.sub("X", 'path = "org/model"  # a hub id\nprint(path)') == "X\nprint(path)"
    assert PATH_LINE.sub("X", "path = compute()\nother_path = 'a'") == "path = compute()\nother_path = 'a'"


def test_a_failing_block_is_named_by_file_and_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\nText.\n\n```python\nraise ValueError('boom')\n```\n\nNeeds a GPU:\n\n```python notest\nx\n```\n"
    )
    found = blocks(readme)
    assert [(line, runs) for line, _, runs, _ in found] == [(5, True), (11, False)]
    assert found[1][3].strip() == "Needs a GPU:"


def test_a_plugin_provides_the_files_its_examples_name(tmp_path):
    plugin = tmp_path / "qcore-x"
    (plugin / "tests").mkdir(parents=True)
    (plugin / "README.md").write_text('```python\nx_path = "model.x"\n```\n')
    (plugin / "tests" / "readme_fixtures.py").write_text(
        "def fixtures(directory, path):\n    directory.mkdir()\n    (directory / 'model.x').write_text(str(path))\n"
        "    return {'x_path': directory / 'model.x'}\n"
    )
    files = plugin_fixtures(plugin / "README.md", tmp_path / "made", tmp_path / "llama")
    assert files == {"x_path": str(tmp_path / "made" / "model.x")}
    assert (tmp_path / "made" / "model.x").read_text() == str(tmp_path / "llama")
