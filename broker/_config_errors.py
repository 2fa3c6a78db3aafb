"""Turning configuration problems into one ConfigError an operator can act on.

Each problem names its dotted key, what is wrong, what is expected, and where the value was
set (the TOML file, an environment variable, or the command line). The text is built here
from error *locations and types* only: pydantic's own messages and its ValidationError text
echo input values, and a value may be a secret (a literal ``client_secret``, or a secret
pasted under a misspelt key), so none of them is passed through.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from broker._config_model import ENV_DELIMITER, ENV_PREFIX, field_description, known_keys
from broker.exceptions import ConfigError

Loc = tuple[str | int, ...]

_TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "list": "a list",
    "dict": "a table",
    "model": "a table",
    "path": "a path",
}
_FIXED = {
    "missing": "is required",
    "string_too_short": "must not be empty",
    "int_from_float": "must be a whole number",
}
_BOUNDS = {
    "greater_than": ("gt", "more than {}"),
    "greater_than_equal": ("ge", "{} or more"),
    "less_than": ("lt", "less than {}"),
    "less_than_equal": ("le", "{} or less"),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, at a pydantic-style location."""

    loc: Loc
    text: str
    hint: str | None = None


@dataclass(frozen=True)
class Origin:
    """Where values came from, so an error can say where to fix them."""

    toml_file: Path | None
    environ: Mapping[str, str]
    overrides: Mapping[str, Any]

    def of(self, loc: Loc) -> str:
        """Where the value at ``loc`` was set, as a phrase; the file when it is not known."""
        keys = [str(p) for p in loc if not isinstance(p, int)]
        if _nested_has(self.overrides, keys):
            return "set on the command line"
        variable = self.env_variable(keys)
        if variable is not None:
            return f"set by environment variable {variable}"
        return f"in {self.toml_file}" if self.toml_file else "no config file was read"

    def env_variable(self, keys: list[str]) -> str | None:
        """The environment variable that set ``keys`` or a table holding them, if one did."""
        names = {name.upper(): name for name in self.environ if name.upper().startswith(ENV_PREFIX)}
        for depth in range(len(keys), 0, -1):
            wanted = ENV_PREFIX + ENV_DELIMITER.join(keys[:depth]).upper()
            if wanted in names:
                return names[wanted]
        return None

    def resolve_path(self, value: Path | None, loc: Loc) -> Path | None:
        """``~`` expanded; a relative path from the TOML file is taken from its directory."""
        if value is None:
            return None
        if value.parts[:1] == ("~",):
            value = home(self.environ).joinpath(*value.parts[1:])
        if not value.is_absolute() and self.toml_file and self.of(loc) == f"in {self.toml_file}":
            value = self.toml_file.parent / value
        return value


def home(environ: Mapping[str, str]) -> Path:
    """$HOME from ``environ`` when it is absolute, else the account's home directory."""
    value = environ.get("HOME", "")
    return Path(value) if value.startswith("/") else Path.home()


def _nested_has(tree: Mapping[str, Any], keys: list[str]) -> bool:
    node: Any = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def dotted(loc: Loc) -> str:
    """``("profiles", "default", "allowed_uids", 0)`` -> ``profiles.default.allowed_uids[0]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def problems_from(exc: ValidationError) -> list[Problem]:
    """One Problem per distinct location, worded from the error's type and context."""
    seen: dict[Loc, Problem] = {}
    for error in exc.errors(include_input=False, include_url=False):
        loc = tuple(error["loc"])
        seen.setdefault(loc, Problem(loc, _describe(error), _hint(error)))
    return list(seen.values())


def _describe(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in _FIXED:
        return _FIXED[kind]
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(tuple(error["loc"]))
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the listed values')}"
    if kind == "value_error":
        return str(ctx.get("error", "is not valid"))  # our own validators' words
    if kind in _BOUNDS:
        name, template = _BOUNDS[kind]
        bound = ctx.get(name)
        return "must be " + template.format(f"{bound:g}" if isinstance(bound, float) else bound)
    word = _TYPE_WORDS.get(kind.split("_")[0])
    return f"must be {word}" if word else f"is not valid ({kind})"


def _hint(error: ErrorDetails) -> str | None:
    if error["type"] in ("extra_forbidden", "missing", "literal_error"):
        return None
    return field_description(tuple(error["loc"]))


def _did_you_mean(loc: Loc) -> str:
    close = difflib.get_close_matches(str(loc[-1]), known_keys(loc), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def line(problem: Problem, origin: Origin) -> str:
    """One problem as one line: key, what is wrong, where it was set, what is expected."""
    text = f"{dotted(problem.loc)}: {problem.text} ({origin.of(problem.loc)})"
    return f"{text}; expected {problem.hint}" if problem.hint else text


def config_error(problems: Iterable[Problem], origin: Origin) -> ConfigError:
    """A single ConfigError listing every problem, one per line when there are several."""
    lines = [line(p, origin) for p in problems]
    if len(lines) == 1:
        return ConfigError(f"invalid configuration: {lines[0]}")
    body = "\n".join(f"  - {text}" for text in lines)
    return ConfigError(f"invalid configuration, {len(lines)} problems:\n{body}")
