"""``qcore new-backend``: write a new backend package from the template shipped in ``qcore/templates/backend/``.

The package it writes has the shape of the in-repo plugins (``pyproject.toml`` with the ``qcore`` entry point,
``README.md``, ``src/qcore_<name>/{__init__,plugin,config,layers}.py``, ``tests/test_conformance.py``) and implements
all six phases with a working example scheme, per-row absmax int8 in plain torch, so it passes the conformance suite
as generated; ``TODO(<name>)`` comments say what each hook must do once the author's library does the quantizing.
Nothing here runs during a load; tests/test_template.py installs a rendered package and runs its conformance suite.

Template files end in ``.tmpl`` (so no tool mistakes them for qcore's own modules) and name their values as
``{{value}}``, in file contents and in paths alike; :func:`template_values` lists the values. Two optional sections
are kept only when asked for: lines between ``{{#reader}}`` and ``{{/reader}}`` (a container reader, for files with
the suffix ``--reader`` names) and between ``{{#calibrating}}`` and ``{{/calibrating}}`` (a calibrating scheme,
``calibrate_block``); ``{{^name}}`` ... ``{{/name}}`` lines are kept only without it. A file left empty by them is
not written.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.utils import canonicalize_name

from qcore.errors import QcoreError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["render", "template_values", "SECTIONS"]

#: The optional sections of the template.
SECTIONS = ("reader", "calibrating")

# Backend names and quant_method values alike: lower-case words joined by single '-' or '_'.
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
# PEP 508 distribution names.
_LIBRARY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_SECTION = re.compile(r"^\{\{([#^])(\w+)\}\}\n(.*?)^\{\{/\2\}\}\n", flags=re.M | re.S)
# File suffixes a container reader may claim: a dot, then lower-case letters and digits.
_READER_SUFFIX = re.compile(r"\.[a-z0-9]+")
_SUFFIX = ".tmpl"


def template_values(
    name: str, *, method: str | None = None, library: str | None = None, reader: str | None = None
) -> dict[str, str]:
    """The values the template names, for a backend called ``name``.

    :param name: the backend's name: distribution ``qcore-<name>``, package ``qcore_<name>``, entry point ``<name>``.
    :param method: the ``quant_method`` it serves; defaults to ``name`` (with ``_`` for ``-``).
    :param library: the distribution of the quantization library it wraps; defaults to ``name``.
    :param reader: the file suffix (``".myfmt"``) of a container the backend reads, for the reader section.
    :raises QcoreError: a value that cannot name a package, an entry point, a method or a file suffix.
    """
    if name.startswith(("qcore-", "qcore_")):
        raise QcoreError(f"give the backend name without the qcore- prefix ({name[6:]!r}); it is added for you")
    if not _NAME.fullmatch(name):
        raise QcoreError(
            f"backend name {name!r} must be lower-case letters and digits, starting with a letter, optionally "
            f"joined by single '-' or '_' (e.g. 'mylib' or 'my-lib'): it names a distribution and a Python package"
        )
    method = method if method is not None else name.replace("-", "_")
    if not _NAME.fullmatch(method):
        raise QcoreError(
            f"quant_method {method!r} must be lower-case letters and digits joined by '-' or '_', as transformers "
            f"spells methods (e.g. 'bitsandbytes', 'compressed-tensors')"
        )
    library = library if library is not None else name
    if not _LIBRARY.fullmatch(library):
        raise QcoreError(f"library {library!r} is not a distribution name pip can install (PEP 508)")
    if reader is not None and not _READER_SUFFIX.fullmatch(reader):
        raise QcoreError(f"reader suffix {reader!r} must be a dot and lower-case letters or digits, e.g. '.myfmt'")
    package = "qcore_" + name.replace("-", "_")
    return {
        **({"suffix": reader} if reader is not None else {}),
        "name": name,
        "distribution": f"qcore-{name}",
        "package": package,
        "method": method,
        "library": library,
        "library_module": _import_name(library),
        "class_prefix": "".join(part.capitalize() for part in re.split("[-_]", name)),
        "qcore_version": importlib.metadata.version("qcore"),
    }


def render(
    name: str,
    *,
    method: str | None = None,
    library: str | None = None,
    reader: str | None = None,
    calibrating: bool = False,
    output: str | Path = ".",
) -> Path:
    """Write the package ``qcore-<name>`` into ``output``; returns its directory.

    The arguments are those of :func:`template_values`; ``reader`` also keeps the container-reader section, and
    ``calibrating`` the calibrating-scheme section.

    :raises QcoreError: a bad value (see :func:`template_values`), or the package directory exists and is not empty.
    """
    values = template_values(name, method=method, library=library, reader=reader)
    sections = {"reader": reader is not None, "calibrating": calibrating}
    target = Path(output) / values["distribution"]
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise QcoreError(f"{target} already exists and is not empty; remove it or choose another --output directory")
    for relative, template in _template_files(importlib.resources.files("qcore") / "templates" / "backend", ()):
        text = _substitute(_sections(template.read_text(encoding="utf-8"), sections), values)
        if not text.strip():
            continue  # the file belongs to a section not asked for
        path = target.joinpath(*(_substitute(part, values) for part in relative))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


def _template_files(directory: Traversable, prefix: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Traversable]]:
    """(path parts without the ``.tmpl`` suffix, file) for every template file under ``directory``."""
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            yield from _template_files(entry, (*prefix, entry.name))
        elif entry.name.endswith(_SUFFIX):
            yield (*prefix, entry.name.removesuffix(_SUFFIX)), entry


def _sections(text: str, sections: dict[str, bool]) -> str:
    """Keep the lines of each section asked for (``{{#name}}``) or not asked for (``{{^name}}``), without their
    marker lines; drop the others."""
    # An unknown section name raises KeyError, as an unknown value does.
    return _SECTION.sub(lambda m: m.group(3) if sections[m.group(2)] == (m.group(1) == "#") else "", text)


def _substitute(text: str, values: dict[str, str]) -> str:
    # An unknown {{value}} raises KeyError: a typo in a template must not reach a new package.
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def _import_name(library: str) -> str:
    """The module ``import`` takes for ``library``: from its installed metadata when it is installed (Pillow is
    ``PIL``), else the usual spelling (``my-lib`` is ``my_lib``)."""
    guess = library.lower().replace("-", "_")
    wanted = canonicalize_name(library)
    modules = [
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if module.isidentifier() and not module.startswith("_")
        and any(canonicalize_name(d) == wanted for d in distributions)
    ]  # fmt: skip
    if guess in modules or len(modules) != 1:
        return guess
    return modules[0]
