"""Render the hook reference (docs/hooks.md) from :mod:`qcore.hookspecs` and the interfaces plugins implement.

``python -m qcore._hookdocs > docs/hooks.md`` regenerates it; tests/test_hook_docs.py fails when the file lists a
hook or an interface method with another signature, or misses one.
"""

from __future__ import annotations

import inspect
from typing import Any

from qcore import hookspecs

#: Every hook, in the order the spec defines them: registration, the six phases with calibration beside
#: ``load_weight``, then the hooks used after loading.
HOOKS = ("register_backend", *hookspecs.PHASES[:4], "calibrate_block", *hookspecs.PHASES[4:], "save_metadata",
         "dequantize_module")  # fmt: skip


def interfaces() -> dict[str, Any]:
    """The classes a plugin implements or is handed beside the hooks, by the name the docs give them."""
    from qcore.calibration import BlockInputs
    from qcore.checkpoint import CheckpointSource, TensorInfo

    return {"CheckpointSource": CheckpointSource, "TensorInfo": TensorInfo, "BlockInputs": BlockInputs}


def signature(name: str) -> str:
    """``name(arg: Type, ...) -> Return`` as written in the spec (annotations are strings, kept verbatim)."""
    return f"{name}{inspect.signature(getattr(hookspecs, name))}".replace("'", "")


def members(cls: type) -> dict[str, str]:
    """The public methods and properties a class defines itself, name -> signature as written."""
    found = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            found[name] = f"{name} (property)"
        elif inspect.isfunction(value):
            found[name] = f"{name}{inspect.signature(value)}".replace("'", "")
    return found


def render() -> str:
    lines = [
        "# Hook reference",
        "",
        "Generated from `core/src/qcore/hookspecs.py` by `python -m qcore._hookdocs`; do not edit by hand.",
        "The phases run in this order for every backend a model uses. Implement them with `@qcore.hookimpl`.",
        "`calibrate_block` runs in phase 4 in place of `load_weight` for a config that needs calibration;",
        "`save_metadata` and `dequantize_module` run after loading. The interfaces a plugin implements or is handed",
        "beside the hooks (a container reader, a calibration batch) follow the hooks.",
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
    lines += ["# Interfaces", ""]
    for title, cls in interfaces().items():
        lines += [f"## `{cls.__module__}.{title}`", "", inspect.getdoc(cls) or "", ""]
        for member, text in members(cls).items():
            value = vars(cls)[member]
            doc = inspect.getdoc(value.fget if isinstance(value, property) else value)
            lines += [f"### `{member}`", "", "```python", text, "```", ""]
            if doc:
                lines += [doc, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
