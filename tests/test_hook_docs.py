"""The hook reference in docs/hooks.md lists every hook of the spec with its current signature."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from qcore import _hookdocs, hookspecs

DOCS = (Path(__file__).parent.parent / "docs" / "hooks.md").read_text()


@pytest.mark.parametrize("name", _hookdocs.HOOKS)
def test_every_hook_is_documented_with_its_signature(name):
    assert f"## `{name}`" in DOCS, (
        f"{name} is missing from docs/hooks.md: run python -m qcore._hookdocs > docs/hooks.md"
    )
    assert _hookdocs.signature(name) in DOCS, f"{name}'s signature in docs/hooks.md is stale: regenerate it"


def test_the_docs_name_no_hook_the_spec_lacks():
    documented = set(re.findall(r"^## `(\w+)`", DOCS, flags=re.M))
    assert documented == set(_hookdocs.HOOKS)
    assert set(hookspecs.PHASES) | set(hookspecs.EXTENSIONS) <= documented


@pytest.mark.parametrize("name", list(_hookdocs.interfaces()))
def test_every_interface_method_is_documented_with_its_signature(name):
    cls = _hookdocs.interfaces()[name]
    assert f"## `{cls.__module__}.{name}`" in DOCS, f"{name} is missing from docs/hooks.md: regenerate it"
    for member, text in _hookdocs.members(cls).items():
        assert f"### `{member}`" in DOCS and text in DOCS, (
            f"{name}.{member} is missing or stale in docs/hooks.md: run python -m qcore._hookdocs > docs/hooks.md"
        )


def test_the_docs_are_exactly_what_the_spec_renders():
    assert _hookdocs.render() == DOCS, "docs/hooks.md is stale: run python -m qcore._hookdocs > docs/hooks.md"
