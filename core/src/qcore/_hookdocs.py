"""Render the hook reference (docs/hooks.md) from :mod:`qcore.hookspecs`.

``python -m qcore._hookdocs > docs/hooks.md`` regenerates it; tests/test_hook_docs.py fails when the file lists a
hook with another signature, or misses one.
"""

from __future__ import annotations

import inspect

from qcore import hookspecs

HOOKS = ("register_backend", *hookspecs.PHASES)


def signature(name: str) -> str:
    """``name(arg: Type, ...) -> Return`` as written in the spec (annotations are strings, kept verbatim)."""
    return f"{name}{inspect.signature(getattr(hookspecs, name))}".replace("'", "")


def render() -> str:
    lines = [
        "# Hook reference",
        "",
        "Generated from `core/src/qcore/hookspecs.py` by `python -m qcore._hookdocs`; do not edit by hand.",
        "The phases run in this order for every backend a model uses. Implement them with `@qcore.hookimpl`.",
        "",
    ]
    for name in HOOKS:
        function = getattr(hookspecs, name)
        firstresult = function.qcore_spec["firstresult"]
        lines += [
            f"## `{name}`",
            "",
            "```python",
            signature(name),
            "```",
            "",
            f"*firstresult*: {'yes' if firstresult else 'no'}",
            "",
            inspect.getdoc(function),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
