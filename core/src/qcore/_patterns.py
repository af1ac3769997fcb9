"""Regular expressions for recipe rules (``re:`` patterns), matched in time linear in the module name.

Used between phases 2 and 3, when a recipe assigns modules to backends. Python's ``re`` backtracks, so a pattern such
as ``(.+)+Z`` takes exponential time on a name without a ``Z``; a recipe can come from a file someone else wrote,
so qcore runs ``re:`` patterns on its own automaton instead: the pattern is parsed by Python's own parser, turned
into a Thompson NFA, and simulated one character at a time over the set of live states (with a cache of the state
sets already seen), so a match costs at most ``len(name) x states`` steps whatever the pattern.

The supported syntax is Python's, less what needs backtracking: literals, ``.``, classes (``[a-z]``, ``\\d``,
``\\w``, ``\\s`` and their negations), groups (capturing or not), alternation ``|``, the quantifiers ``* + ? {m,n}``
(greedy or lazy, which find the same matches), and the anchors ``^ $ \\A \\Z \\b \\B``. Backreferences, lookaround,
conditionals, atomic groups, possessive quantifiers and inline flags are refused with a :class:`ConfigError`.
"""

from __future__ import annotations

import functools
from typing import Any

from qcore.errors import ConfigError

try:  # Python 3.11+
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

__all__ = ["LinearPattern", "compile_pattern"]

#: Automaton size limit: a counted repeat is expanded into copies, so ``a{1000}{1000}`` would otherwise be huge.
MAX_STATES = 10_000
#: Cached state-set transitions per pattern before the cache starts over (bounds its memory).
_MAX_CACHED = 20_000


class _State:
    __slots__ = ("kind", "test", "edges")

    def __init__(self, kind: str, test: Any = None, edges: list[_State] | None = None):
        self.kind = kind  # "char" (test: char -> bool), "split", "assert" (test: anchor name), "match"
        self.test = test
        self.edges = edges if edges is not None else []


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> LinearPattern:
    """The automaton for ``pattern`` (the part after ``re:``).

    :raises ConfigError: not a valid regular expression, or one using syntax that needs backtracking.
    """
    return LinearPattern(pattern)


class LinearPattern:
    """A compiled ``re:`` pattern; :meth:`search` answers what ``re.search(pattern, text) is not None`` would."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        try:
            parsed = sre_parse.parse(pattern)
        except (sre.error, RecursionError, OverflowError) as error:
            raise ConfigError(f"recipe pattern 're:{pattern}' is not a valid regular expression: {error}") from None
        flags = parsed.state.flags & ~(sre.SRE_FLAG_UNICODE)
        if flags:
            raise self._unsupported("inline flags such as (?i)")
        self._count = 0
        self.start = self._build(list(parsed), _State("match"))
        self._cache: dict[Any, frozenset[_State]] = {}

    def _unsupported(self, what: str) -> ConfigError:
        return ConfigError(
            f"recipe pattern 're:{self.pattern}' uses {what}, which qcore does not support: recipe patterns are "
            f"matched in linear time, without backtracking. Use a glob, or a regular expression with literals, "
            f"classes, groups, '|', quantifiers and anchors only"
        )

    def _new(self, kind: str, test: Any = None, edges: list[_State] | None = None) -> _State:
        self._count += 1
        if self._count > MAX_STATES:
            raise ConfigError(
                f"recipe pattern 're:{self.pattern}' expands to more than {MAX_STATES} automaton states (counted "
                f"repeats multiply); write it with '*' or '+' instead of large counts"
            )
        return _State(kind, test, edges)

    # -- construction: each item is compiled in front of the state that follows it --------------------------

    def _build(self, items: list[Any], after: _State) -> _State:
        for op, value in reversed(items):
            after = self._item(op, value, after)
        return after

    def _item(self, op: Any, value: Any, after: _State) -> _State:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            return self._new("char", _char_test(op, value), [after])
        if op is sre.SUBPATTERN:
            group, add_flags, del_flags, body = value
            if add_flags or del_flags:
                raise self._unsupported("inline flags such as (?i:...)")
            return self._build(list(body), after)
        if op is sre.BRANCH:
            return self._new("split", None, [self._build(list(arm), after) for arm in value[1]])
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = value
            return self._repeat(list(body), low, None if high is sre.MAXREPEAT else high, after)
        if op is sre.AT:
            anchors = {
                sre.AT_BEGINNING: "begin", sre.AT_BEGINNING_STRING: "begin", sre.AT_END: "end",
                sre.AT_END_STRING: "end_string", sre.AT_BOUNDARY: "boundary", sre.AT_NON_BOUNDARY: "non_boundary",
            }  # fmt: skip
            if value not in anchors:
                raise self._unsupported(f"the anchor {value}")
            return self._new("assert", anchors[value], [after])
        names = {
            "GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group", "ASSERT": "a lookaround",
            "ASSERT_NOT": "a negative lookaround", "ATOMIC_GROUP": "an atomic group",
            "POSSESSIVE_REPEAT": "a possessive quantifier",
        }  # fmt: skip
        raise self._unsupported(names.get(str(op), str(op)))

    def _repeat(self, body: list[Any], low: int, high: int | None, after: _State) -> _State:
        if high is None:
            loop = self._new("split")
            loop.edges = [self._build(body, loop), after]
            tail = loop
        else:
            tail = after
            for _ in range(high - low):
                tail = self._new("split", None, [self._build(body, tail), after])
        for _ in range(low):
            tail = self._build(body, tail)
        return tail

    # -- simulation -----------------------------------------------------------------------------------------

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text``; at most ``len(text) + 1`` steps over state sets."""
        current: frozenset[_State] = frozenset()
        for index in range(len(text) + 1):
            context = _context(text, index)
            current = self._closure(current, context)
            if any(state.kind == "match" for state in current):
                return True
            if index == len(text):
                return False
            current = self._step(current, text[index])
        return False

    def _closure(self, states: frozenset[_State], context: tuple[bool, ...]) -> frozenset[_State]:
        key = ("closure", states, context)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        seen: set[_State] = set()
        stack = [self.start, *states]  # a search may start a match at every position
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            if state.kind == "split" or (state.kind == "assert" and _holds(state.test, context)):
                stack.extend(state.edges)
        result = frozenset(s for s in seen if s.kind in ("char", "match"))
        return self._remember(key, result)

    def _step(self, states: frozenset[_State], char: str) -> frozenset[_State]:
        key = ("step", states, char)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = frozenset(s.edges[0] for s in states if s.kind == "char" and s.test(char))
        return self._remember(key, result)

    def _remember(self, key: Any, value: frozenset[_State]) -> frozenset[_State]:
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = value
        return value


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _context(text: str, index: int) -> tuple[bool, bool, bool, bool, bool]:
    """What the anchors look at, at ``index``: at the start, at the very end, at the end or before a final newline
    (where ``$`` also matches, as in ``re``), and whether the characters before and after are word characters."""
    at_end = index == len(text)
    return (
        index == 0,
        at_end,
        at_end or (index == len(text) - 1 and text[index] == "\n"),
        index > 0 and _is_word(text[index - 1]),
        not at_end and _is_word(text[index]),
    )


def _holds(anchor: str, context: tuple[bool, bool, bool, bool, bool]) -> bool:
    at_start, at_end, at_line_end, before, after = context
    return {
        "begin": at_start,
        "end_string": at_end,
        "end": at_line_end,
        "boundary": before != after,
        "non_boundary": before == after,
    }[anchor]


_CATEGORIES = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    sre.CATEGORY_WORD: _is_word,
    sre.CATEGORY_NOT_WORD: lambda c: not _is_word(c),
}


def _char_test(op: Any, value: Any):
    if op is sre.LITERAL:
        wanted = chr(value)
        return lambda c: c == wanted
    if op is sre.NOT_LITERAL:
        unwanted = chr(value)
        return lambda c: c != unwanted
    if op is sre.ANY:
        return lambda c: c != "\n"
    negate = bool(value) and value[0][0] is sre.NEGATE
    tests = []
    for kind, item in value[1:] if negate else value:
        if kind is sre.LITERAL:
            tests.append(lambda c, code=item: ord(c) == code)
        elif kind is sre.RANGE:
            tests.append(lambda c, low=item[0], high=item[1]: low <= ord(c) <= high)
        elif kind is sre.CATEGORY and item in _CATEGORIES:
            tests.append(_CATEGORIES[item])
        else:
            raise ConfigError(f"recipe pattern class item {kind} {item} is not supported")
    return lambda c: any(test(c) for test in tests) != negate
