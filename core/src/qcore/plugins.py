"""Plugin discovery and the method registry.

Plugins are found through the ``qcore`` entry-point group and registered with a pluggy ``PluginManager``
validated against :mod:`qcore.hookspecs`. A plugin that fails to import or register is recorded with its error and
listed as unavailable; it never stops the others from loading. Nothing here imports torch or a backend's library.

Environment:

* ``QCORE_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry points (plugins can still be registered in code).
* ``QCORE_LOAD_PLUGINS=qcore-hqq,qcore-bnb`` loads only these distributions.
* ``QCORE_PREFER=hqq=my-hqq,eetq=qcore-eetq`` picks the distribution that serves a method when several claim it.
  Without it the distribution whose name sorts first wins; the clash is reported by :func:`backends`, and each load
  logs which distribution served the method (a warning, or info when ``QCORE_PREFER`` chose it).

A method whose plugin is installed but excluded by one of these variables is reported as such, naming the variable.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import warnings
from typing import Any

import pluggy

from qcore import hookspecs
from qcore.backend import Backend, BackendInfo
from qcore.errors import ConfigError

__all__ = ["backends", "plugin_manager", "register_plugin", "reset_plugins", "config_class_for", "backend_for"]

logger = logging.getLogger("qcore")

ENTRY_POINT_GROUP = "qcore"

#: Methods qcore knows a plugin for, so an unknown-method error can name the package to install.
KNOWN_PLUGINS = {
    "bitsandbytes": "qcore-bnb", "hqq": "qcore-hqq", "eetq": "qcore-eetq", "gptq": "qcore-gptq", "awq": "qcore-gptq",
    "compressed-tensors": "qcore-compressed-tensors", "gguf": "qcore-gguf", "torchao": "qcore-torchao",
    "quanto": "qcore-quanto", "fp8": "qcore-fp8",
}  # fmt: skip
#: Container suffixes qcore knows a reader plugin for, so an unreadable file's error can name the package.
KNOWN_READERS = {".gguf": "qcore-gguf"}


@dataclasses.dataclass
class _Registered:
    """A plugin that registered, with where it came from and the backend it declared (if any)."""

    plugin: Any
    plugin_name: str
    distribution: str
    version: str
    backend: Backend | None


@dataclasses.dataclass
class _Registry:
    manager: pluggy.PluginManager
    registered: dict[str, _Registered] = dataclasses.field(default_factory=dict)
    #: distribution -> error text, for plugins that failed to import or register.
    broken: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    #: quant_method -> every plugin name that claims it, winner first.
    claims: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: (phase, plugin name) -> hook caller restricted to that backend (observers included); rebuilt on any change.
    callers: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)

    def caller(self, phase: str, plugin_name: str) -> Any:
        """Call ``phase`` on one backend only: every other backend is left out, observers stay in."""
        key = (phase, plugin_name)
        if key not in self.callers:
            others = [
                r.plugin for r in self.registered.values() if r.backend is not None and r.plugin_name != plugin_name
            ]
            self.callers[key] = self.manager.subset_hook_caller(phase, remove_plugins=others)
        return self.callers[key]

    def add(self, plugin: Any, plugin_name: str, distribution: str, version: str) -> None:
        self.callers.clear()
        self.manager.register(plugin, name=plugin_name)
        impls = [i for i in self.manager.hook.register_backend.get_hookimpls() if i.plugin is plugin]
        backend = impls[0].function() if impls else None
        if backend is not None and not isinstance(backend, Backend):
            self.manager.unregister(plugin)
            raise TypeError(f"register_backend returned {type(backend).__name__}, expected qcore.Backend")
        self.registered[plugin_name] = _Registered(plugin, plugin_name, distribution, version, backend)
        if backend is not None:
            for method in backend.configs:
                self.claims.setdefault(method, []).append(plugin_name)
                self.claims[method].sort(key=lambda name: _preference_key(method, self.registered[name]))


def _preference_key(method: str, registered: _Registered) -> tuple[int, str]:
    preferred = dict(item.split("=", 1) for item in os.environ.get("QCORE_PREFER", "").split(",") if "=" in item).get(
        method
    )
    return (0 if preferred in (registered.distribution, registered.plugin_name) else 1, registered.distribution)


_registry: _Registry | None = None


def _load() -> _Registry:
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    registry = _Registry(manager)
    if os.environ.get("QCORE_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0"):
        return registry
    only = {name.strip() for name in os.environ.get("QCORE_LOAD_PLUGINS", "").split(",") if name.strip()}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        distribution = entry_point.dist.name if entry_point.dist else entry_point.name
        version = entry_point.dist.version if entry_point.dist else "?"
        if only and distribution not in only and entry_point.name not in only:
            continue
        # Two distributions may pick the same entry-point name; keep both, the second under a qualified name.
        plugin_name = (
            entry_point.name if entry_point.name not in registry.registered else f"{distribution}:{entry_point.name}"
        )
        try:
            registry.add(entry_point.load(), plugin_name, distribution, version)
        except Exception as error:  # a broken plugin must not stop the others
            registry.broken[plugin_name] = (distribution, f"{type(error).__name__}: {error}")
            warnings.warn(f"qcore plugin {distribution} failed to load: {error}", stacklevel=2)
    manager.check_pending()
    return registry


def _get() -> _Registry:
    global _registry
    if _registry is None:
        _registry = _load()
    return _registry


def phase_caller(phase: str, plugin_name: str) -> Any:
    """A hook caller for ``phase`` that reaches the backend ``plugin_name`` and every observer, no other backend."""
    return _get().caller(phase, plugin_name)


def plugin_packages() -> dict[str, str]:
    """Top-level package of each registered plugin -> its distribution (to name the plugin behind an exception)."""
    packages = {}
    for registered in _get().registered.values():
        name = getattr(registered.plugin, "__name__", None) or type(registered.plugin).__module__
        packages[name.split(".")[0]] = registered.distribution
    return packages


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (discovers plugins on first use)."""
    return _get().manager


def register_plugin(plugin: Any, name: str | None = None, *, distribution: str | None = None) -> str:
    """Register a plugin object (a module or an instance with hookimpls) by hand, e.g. an observer or a test backend.

    :returns: the name it is registered under (pass it to :func:`unregister_plugin`); by default the module's name,
        or the class name and the object's id for an instance, so two instances of one class can be registered.
    """
    name = name or getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
    _get().add(plugin, name, distribution or name, "0")
    _get().manager.check_pending()
    return name


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name``."""
    registry = _get()
    registered = registry.registered.pop(name)
    registry.callers.clear()
    registry.manager.unregister(registered.plugin)
    for claimants in registry.claims.values():
        if name in claimants:
            claimants.remove(name)


def reset_plugins() -> None:
    """Forget every plugin; the next use rediscovers them (honours the environment variables anew)."""
    global _registry
    _registry = None


def backend_for(method: str) -> _Registered:
    """The registered plugin that serves ``method``, by the preference rule in the module docstring."""
    registry = _get()
    claimants = registry.claims.get(method)
    if not claimants:
        raise ConfigError(_unknown_method_message(method, registry))
    return registry.registered[claimants[0]]


def config_class_for(method: str) -> type:
    """The config class registered for ``method``."""
    backend = backend_for(method).backend
    assert backend is not None
    return backend.configs[method]


def _unknown_method_message(method: str, registry: _Registry) -> str:
    installed = sorted(m for m, c in registry.claims.items() if c) or ["none"]
    message = f"unknown quant_method {method!r}; installed methods: {', '.join(installed)}."
    if method in KNOWN_PLUGINS:
        package = KNOWN_PLUGINS[method]
        broken = [error for name, (dist, error) in registry.broken.items() if dist == package]
        excluded = _excluded_by_environment(package)
        if broken:
            message += f" The plugin {package} is installed but failed to load ({broken[0]}); reinstall it."
        elif excluded:
            message += f" The plugin {package} is installed but was not loaded: {excluded}."
        else:
            message += f" Install its plugin: pip install {package}"
    else:
        message += " Install a qcore plugin that serves it (look for packages named qcore-*)."
    return message


def _excluded_by_environment(distribution: str) -> str | None:
    """Why an installed plugin distribution was not loaded, naming the environment variable; ``None`` if it was not
    excluded (or is not installed with an entry point)."""
    points = [
        ep
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and _normalized(ep.dist.name) == _normalized(distribution)
    ]
    if not points:
        return None
    disabled = os.environ.get("QCORE_DISABLE_PLUGIN_AUTOLOAD", "")
    if disabled not in ("", "0"):
        return (
            f"QCORE_DISABLE_PLUGIN_AUTOLOAD={disabled} turns off loading installed plugins; unset it, or register the "
            f"plugin in code with qcore.register_plugin"
        )
    only = os.environ.get("QCORE_LOAD_PLUGINS", "")
    names = {name.strip() for name in only.split(",") if name.strip()}
    if names and not names & {distribution, *(ep.name for ep in points)}:
        return f"QCORE_LOAD_PLUGINS={only} does not list it; add {distribution} to it, or unset it"
    return None


def _normalized(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


def backends() -> list[BackendInfo]:
    """Every discovered backend, usable or not, with the reason and fix when it is not.

    Imports neither torch nor any backend library.
    """
    registry = _get()
    infos = []
    for registered in registry.registered.values():
        backend = registered.backend
        if backend is None:
            continue
        reason = backend.unavailable_reason()
        shadowed = [m for m in backend.configs if registry.claims[m][0] != registered.plugin_name]
        if shadowed and reason is None:
            winners = {registry.registered[registry.claims[m][0]].distribution for m in shadowed}
            reason = (
                f"also claimed by {', '.join(sorted(winners))}, which serves {', '.join(shadowed)}; "
                f"set QCORE_PREFER={shadowed[0]}={registered.distribution} to use this one"
            )
        notes = backend.notes() if reason is None and backend.notes is not None else None
        infos.append(
            BackendInfo(
                name=backend.name,
                distribution=registered.distribution,
                version=registered.version,
                methods=tuple(backend.configs),
                presets=tuple(p.name for p in backend.presets),
                available=reason is None,
                reason=reason,
                notes=notes,
            )
        )
    for name, (distribution, error) in registry.broken.items():
        infos.append(
            BackendInfo(
                name=name,
                distribution=distribution,
                version=_version(distribution),
                methods=(),
                presets=(),
                available=False,
                reason=f"failed to load: {error}; reinstall it (pip install -U {distribution})",
            )
        )
    return infos


def readers() -> dict[str, tuple[str, Any]]:
    """Every container reader the registered backends declare: suffix -> (distribution, factory).

    When two plugins read one suffix, the distribution whose name sorts first wins (as for methods).
    """
    found: dict[str, tuple[str, Any]] = {}
    for registered in sorted(_get().registered.values(), key=lambda r: r.distribution, reverse=True):
        if registered.backend is not None:
            for suffix, factory in registered.backend.readers.items():
                found[suffix.lower()] = (registered.distribution, factory)
    return found


def presets() -> dict[str, tuple[str, Any]]:
    """Every preset of every registered backend: name -> (backend name, :class:`~qcore.Preset`)."""
    found = {}
    for registered in _get().registered.values():
        if registered.backend is not None:
            for preset in registered.backend.presets:
                found[preset.name] = (registered.backend.name, preset)
    return found


def preset_config(name: str) -> dict[str, Any]:
    """The config dict of the preset ``name``."""
    found = presets()
    if name not in found:
        raise ConfigError(f"unknown preset {name!r}; installed presets: {', '.join(sorted(found)) or 'none'}")
    return dict(found[name][1].config)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def ensure_available(method: str) -> _Registered:
    """The plugin serving ``method``, raising :class:`BackendUnavailable` with the fix when it cannot run here."""
    from qcore.errors import BackendUnavailable

    registered = backend_for(method)
    assert registered.backend is not None
    reason = registered.backend.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"{method}: backend {registered.distribution} cannot run: {reason}")
    registry = _get()
    others = [registry.registered[name].distribution for name in registry.claims[method][1:]]
    if others:
        chosen_by_user = _preference_key(method, registered)[0] == 0
        logger.log(
            logging.INFO if chosen_by_user else logging.WARNING,
            "quant_method %r is served by %s %s%s; also claimed by %s (QCORE_PREFER=%s=<distribution> picks one)",
            method,
            registered.distribution,
            registered.version,
            " (chosen by QCORE_PREFER)" if chosen_by_user else "",
            ", ".join(others),
            method,
        )
    return registered
