"""Recipes: which quantization config each module gets, for one method or several in one model.

A :class:`Recipe` is an ordered list of rules, each a module-name pattern (a glob, or ``re:`` and a regular
expression) mapped to a config or to ``None`` (keep full precision); the first matching rule wins and unmatched
modules follow ``default``. A plain config is the one-rule case. The loader uses :meth:`Recipe.assign` between
phases 2 and 3 to give each backend its ``context.modules``.

Patterns are matched in bounded time: globs by :func:`fnmatch.fnmatchcase` (linear in CPython), ``re:`` patterns by
qcore's own automaton (``qcore._patterns``), never by backtracking. A recipe stored in a checkpoint's config.json
is not matched at all: it records the exact module -> config assignment that was applied, and reloading uses that.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

from qcore._patterns import compile_pattern
from qcore.config import QuantConfig
from qcore.errors import ConfigError

__all__ = ["Recipe", "Rule", "RECIPE_METHOD"]

#: The ``quant_method`` under which a mixed model's config.json records its recipe.
RECIPE_METHOD = "qcore_recipe"


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    config: QuantConfig | None

    def matches(self, module_name: str) -> bool:
        if self.pattern.startswith("re:"):
            return compile_pattern(self.pattern[3:]).search(module_name)
        return fnmatch.fnmatchcase(module_name, self.pattern)


class Recipe:
    """Ordered ``pattern -> config | None`` rules plus a default, usable wherever a quantization config is."""

    def __init__(
        self,
        rules: Sequence[tuple[str, Any] | Mapping[str, Any]] = (),
        default: QuantConfig | Mapping[str, Any] | None = None,
        *,
        modules: Mapping[str, int] | None = None,
    ):
        self.rules = [_rule(item) for item in rules]
        self.default = _config(default, "default")
        #: For a saved model: the exact module -> index into :meth:`configs` that was applied.
        self.modules = dict(modules) if modules is not None else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, stored: bool = False) -> Recipe:
        """Parse ``{"rules": [{"pattern": ..., "config": {...} | null}, ...], "default": {...} | null}``.

        :param stored: the recipe comes from a checkpoint's config.json. It must then carry the exact assignment
            (``modules`` and ``configs``, as :meth:`to_dict` writes it), which is all a reload uses: its rules are
            kept only to be written again and their patterns are never compiled or matched.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a recipe must be a dict, not {type(data).__name__}")
        rules = data.get("rules", [])
        if not isinstance(rules, list):
            raise ConfigError("recipe field 'rules' must be a list of {pattern, config} objects")
        recipe = cls(default=data.get("default"))
        recipe.rules = [_rule(item, compile_re=not stored) for item in rules]
        modules = data.get("modules")
        if stored and modules is None:
            raise ConfigError(
                "a stored recipe must record the exact assignment it applied ('modules' and 'configs', as "
                "qcore.save_pretrained writes them); qcore does not match a checkpoint's patterns. Save the model "
                "again with qcore, or load the full-precision checkpoint with your own recipe"
            )
        if modules is not None:
            saved = data.get("configs", [])
            # Each entry is a config some module was quantized with; full-precision modules are simply absent.
            if not isinstance(saved, list) or any(c is None for c in saved):
                raise ConfigError("recipe field 'configs' must be a list of quantization configs (no nulls)")
            configs = [_config(c, f"configs[{i}]") for i, c in enumerate(saved)]
            if not isinstance(modules, Mapping) or not all(
                isinstance(name, str) and isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(configs)
                for name, i in modules.items()
            ):
                raise ConfigError("recipe field 'modules' must map module names to indexes into 'configs'")
            recipe.modules = dict(modules)
            recipe._saved_configs = configs
        return recipe

    def configs(self) -> list[QuantConfig]:
        """The distinct configs the recipe uses, in rule order then the default."""
        saved = getattr(self, "_saved_configs", None)
        if saved is not None:
            return saved
        found: list[QuantConfig] = []
        for config in [r.config for r in self.rules] + [self.default]:
            if config is not None and not any(config is c for c in found):
                found.append(config)
        return found

    def to_dict(self, applied: Mapping[str, QuantConfig] | None = None) -> dict[str, Any]:
        """The recipe as written into config.json; with ``applied`` (module -> config) the exact assignment too."""
        data: dict[str, Any] = {
            "quant_method": RECIPE_METHOD,
            "rules": [{"pattern": r.pattern, "config": r.config and r.config.to_dict()} for r in self.rules],
            "default": self.default and self.default.to_dict(),
        }
        if applied is not None:
            configs = self.configs()
            data["configs"] = [c.to_dict() for c in configs]
            data["modules"] = {
                name: next(i for i, c in enumerate(configs) if c is cfg) for name, cfg in applied.items()
            }
        return data

    def assign(
        self, candidates: Sequence[str], default_keep: Sequence[str], always_keep: Sequence[str] = ()
    ) -> tuple[dict[str, QuantConfig], list[str]]:
        """Module -> config for every candidate that gets quantized, and the patterns that matched nothing.

        ``default_keep`` are the modules transformers keeps in full precision unless the config has its own skip
        list (output embeddings, tied weights, the last module); ``always_keep`` are the model's
        ``_keep_in_fp32_modules``. Both apply to modules that fall to the default; a rule that names a module wins.
        """
        if self.modules is not None:
            configs = self.configs()
            return {name: configs[i] for name, i in self.modules.items()}, []
        from transformers.quantizers.quantizers_utils import should_convert_module

        assigned: dict[str, QuantConfig] = {}
        used = [False] * len(self.rules)
        for name in candidates:
            for index, rule in enumerate(self.rules):
                if rule.matches(name):
                    used[index] = True
                    if rule.config is not None:
                        assigned[name] = rule.config
                    break
            else:
                config = self.default
                if config is None:
                    continue
                skip = config.skip_modules()
                if should_convert_module(name, [*(default_keep if skip is None else skip), *always_keep]):
                    assigned[name] = config
        return assigned, [rule.pattern for rule, hit in zip(self.rules, used, strict=True) if not hit]

    def single_config(self, applied: Mapping[str, QuantConfig]) -> QuantConfig | None:
        """The one config every quantized module uses, if there is exactly one (so the plain format can be saved)."""
        distinct = {id(c): c for c in applied.values()}
        return next(iter(distinct.values())) if len(distinct) == 1 else None


def _rule(item: tuple[str, Any] | Mapping[str, Any], *, compile_re: bool = True) -> Rule:
    if isinstance(item, Mapping):
        if set(item) - {"pattern", "config"} or not isinstance(item.get("pattern"), str):
            raise ConfigError(f"recipe rule {dict(item)!r} must be {{'pattern': str, 'config': dict | null}}")
        pattern, config = item["pattern"], item.get("config")
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
        pattern, config = item
    else:
        raise ConfigError(
            f"recipe rule {item!r} must be a (pattern, config) pair or {{'pattern': str, 'config': dict | null}}"
        )
    if pattern.startswith("re:") and compile_re:
        compile_pattern(pattern[3:])  # refuses, with a ConfigError, what cannot be matched without backtracking
    return Rule(pattern, _config(config, f"rule {pattern!r}"))


def _config(value: Any, where: str) -> QuantConfig | None:
    if value is None:
        return None
    try:
        return QuantConfig.from_dict(value)
    except ConfigError as error:
        raise ConfigError(f"recipe {where}: {error}") from None
