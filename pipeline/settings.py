"""Settings declared once, as fields of frozen dataclasses.

A setting is a dataclass field made with `setting(...)`. Its name gives the flag (`max_batch`:
`--max-batch`) and the environment variable (`AEWATCH_MAX_BATCH`), its annotation the type
(`str`, `int`, `float`, `bool`, optional ones, or `tuple[str, ...]` for a repeatable flag), and
its metadata the help text, the choices, the lower bound, whether it is required and whether it is
secret. A group is a frozen dataclass of settings; a settings object nests groups, and a setting's
name is unique across all of them. Everything else comes from these declarations:

- `add_arguments`: the command-line flags (`[env ...]` in their help);
- `read`: flag first, then environment variable, then default, each value converted and checked;
- `build`, `replace`: the nested object from flat `{name: value}`, or a copy with some changed;
- `check`: required, type, choices and bounds of a group's own fields (groups call it first in
  `__post_init__`, then check what involves several of their fields); a `ConfigError` names the
  setting;
- `to_argv`, `redacted` and `table`: the object's command line (defaults and secrets left out),
  its log form (secrets masked) and the Markdown table of the README; `child_environment` the
  environment of a child process given that command line.

Only the command line reads the environment: `read` takes it as an argument.

Size: over 400 lines because every use of a declaration (flags, variables, checks, command lines,
the README's table) is read off the same metadata here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from pipeline.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "Setting",
    "add_arguments",
    "build",
    "check",
    "declared",
    "finite_float",
    "read",
    "redacted",
    "replace",
    "secret_variables",
    "setting",
    "table",
    "to_argv",
]

ENV_PREFIX = "AEWATCH_"
_KEY = "aewatch.setting"


@dataclass(frozen=True)
class _Declaration:
    help: str
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    required: bool
    secret: bool
    env: str | None
    listed: bool


@dataclass(frozen=True)
class Setting:
    """One declared setting, as the command line and the README see it."""

    name: str
    help: str
    default: object
    type: type  # str, int, float or bool (of each item, when repeatable)
    repeatable: bool
    optional: bool
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    required: bool
    secret: bool
    env: str
    listed: bool  # False: read from `env` only, no flag and no row in the table
    path: tuple[str, ...]  # attribute names from the settings object down to this setting

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(
    help: str,  # noqa: A002 - the word argparse uses
    default: object = None,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    required: bool = False,
    secret: bool = False,
    env: str | None = None,
    listed: bool = True,
) -> Any:
    """A settings field: `default`, and what the flag, the variable and the checks need."""
    declaration = _Declaration(help, choices, minimum, maximum, required, secret, env, listed)
    return dataclasses.field(default=default, repr=not secret, metadata={_KEY: declaration})


def _resolve(hint) -> tuple[type, bool, bool]:
    """(item type, optional, repeatable) of a field annotation."""
    optional = repeatable = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is tuple:
        repeatable, hint = True, typing.get_args(hint)[0]
    return hint, optional, repeatable


@cache
def declared(cls: type) -> tuple[Setting, ...]:
    """Every setting of a settings class, its groups' included, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += [dataclasses.replace(s, path=(f.name, *s.path)) for s in declared(hint)]
            continue
        declaration = f.metadata.get(_KEY)
        if declaration is None:
            continue
        kind, optional, repeatable = _resolve(hint)
        out.append(
            Setting(
                name=f.name,
                help=declaration.help,
                default=f.default,
                type=kind,
                repeatable=repeatable,
                optional=optional,
                choices=declaration.choices,
                minimum=declaration.minimum,
                maximum=declaration.maximum,
                required=declaration.required,
                secret=declaration.secret,
                env=declaration.env or ENV_PREFIX + f.name.upper(),
                listed=declaration.listed,
                path=(f.name,),
            )
        )
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: a setting name is declared twice")
    return tuple(out)


def _own(obj) -> Iterator[tuple[Setting, object]]:
    """A group's own settings (not those of nested groups) with their values."""
    for s in declared(type(obj)):
        if len(s.path) == 1:
            yield s, getattr(obj, s.name)


def check(group) -> None:
    """Check the group's own settings: required, type (a float one finite), choices, bounds."""
    for s, value in _own(group):
        if s.required and not value:
            raise ConfigError(s.name, f"is required ({s.flag} or {s.env})")
        if value is None or (s.repeatable and not value):
            continue
        for item in value if s.repeatable else (value,):
            wrong = isinstance(item, bool) != (s.type is bool) or not isinstance(item, s.type)
            if s.type is float and isinstance(item, int) and not isinstance(item, bool):
                wrong = False
            if wrong:
                raise ConfigError(s.name, f"must be {s.type.__name__}, got {item!r}")
            # NaN passes every bound, and no wait or sleep takes infinity
            if s.type is float and not math.isfinite(item):
                raise ConfigError(s.name, f"must be a finite number, got {item}")
            if s.choices and item not in s.choices:
                raise ConfigError(s.name, f"{item!r} is not one of {', '.join(s.choices)}")
            if s.minimum is not None and item < s.minimum:
                raise ConfigError(s.name, f"must be >= {s.minimum:g}, got {item}")
            if s.maximum is not None and item > s.maximum:
                raise ConfigError(s.name, f"must be <= {s.maximum:g}, got {item}")


def _value(obj, s: Setting):
    for name in s.path:
        obj = getattr(obj, name)
    return obj


def build(cls: type, values: Mapping[str, object]):
    """The settings object of `cls` from flat values ({setting name: value}); settings left out
    take their defaults."""
    unknown = set(values) - {s.name for s in declared(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown settings {sorted(unknown)}")
    return _build(cls, values)


def replace(obj, **values):
    """A copy of settings object `obj` with these settings (by name) changed, checked again."""
    current = {s.name: _value(obj, s) for s in declared(type(obj))}
    return build(type(obj), {**current, **values})


def _build(cls: type, values: Mapping[str, object]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    names: tuple[str, ...] | None = None,
    env: bool = True,
) -> None:
    """The flags of `cls`'s settings (or of those `names`); every default is None, so that
    `read` can tell a flag given from one left out."""
    for s in declared(cls):
        if not s.listed or (names is not None and s.name not in names):
            continue
        text = f"{s.help} [env {s.env}]" if env else s.help
        kwargs: dict = {"help": text, "default": None}
        if s.type is bool:
            kwargs.update(action="store_const", const=True)
        elif s.repeatable:
            kwargs["action"] = "append"
        parser.add_argument(s.flag, dest=s.name, **kwargs)


def finite_float(text: str) -> float:
    """An argparse type: a finite number (NaN and infinity are refused naming the flag)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _at_least(value, minimum: int, text: str):
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
    return value


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _at_least(int(text), 1, text)


def whole(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    return _at_least(int(text), 0, text)


def non_empty(text: str) -> str:
    """An argparse type: text with something besides spaces in it (an MLflow experiment name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def random_seed(text: str) -> int:
    """An argparse type: a random seed, a whole number that fits 63 bits (torch and numpy take
    it; a larger one failed in torch after the data was read)."""
    value = whole(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {text!r}")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    return _at_least(finite_float(text), 0, text)


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def _convert(s: Setting, raw, source: str):
    try:
        if s.repeatable:
            return tuple(s.type(item) for item in raw)
        if s.type is bool:
            return raw if isinstance(raw, bool) else _parse_bool(raw)
        return s.type(raw)
    except (TypeError, ValueError):
        raise ConfigError(s.name, f"invalid value {raw!r} from {source}") from None


def read(
    cls: type,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    names: tuple[str, ...] | None = None,
) -> dict[str, object]:
    """Flat values of `cls`'s settings (or of those `names`): the flag, else the environment
    variable (a repeatable one comma-separated), else the default; converted and checked
    against its choices, naming where a bad value came from."""
    values: dict[str, object] = {}
    for s in declared(cls):
        if names is not None and s.name not in names:
            continue
        raw, source = (getattr(args, s.name, None), s.flag) if s.listed else (None, s.env)
        if raw is None and s.env in environ:
            raw, source = environ[s.env], s.env
            if s.repeatable:
                raw = [item.strip() for item in raw.split(",") if item.strip()]
        if raw is None:
            values[s.name] = s.default
            continue
        value = _convert(s, raw, source)
        for item in value if s.repeatable else (value,):
            if s.choices and item not in s.choices:
                raise ConfigError(
                    s.name, f"{item!r} from {source} is not one of {', '.join(s.choices)}"
                )
        values[s.name] = value
    return values


def to_argv(obj) -> list[str]:
    """Flags that give these settings (defaults left out). Secrets are never put on a command
    line, where any process could read them, nor settings read from the environment only."""
    argv: list[str] = []
    for s in declared(type(obj)):
        value = _value(obj, s)
        if s.secret or not s.listed or value is None or value == s.default:
            continue
        if s.type is bool and not s.repeatable:
            argv.append(s.flag)  # a bool that differs from its default (False)
        elif s.repeatable:
            for item in value:
                argv += [s.flag, str(item)]
        else:
            argv += [s.flag, str(value)]
    return argv


def child_environment(obj, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a child process run with `to_argv(obj)`: `environ` without the
    variables of the settings the flags give (the child would read one wherever `to_argv` leaves
    a default out), with the secrets' variables (`secret_variables`)."""
    given = {s.env for s in declared(type(obj)) if s.listed and not s.secret and s.env}
    kept = {name: value for name, value in environ.items() if name not in given}
    return {**kept, **secret_variables(obj)}


def secret_variables(obj) -> dict[str, str]:
    """The environment variables that give the secrets `to_argv` leaves out (for a child
    process of the same settings)."""
    out = {}
    for s in declared(type(obj)):
        value = _value(obj, s)
        if s.secret and value:
            out[s.env] = str(value)
    return out


def redacted(obj) -> dict[str, object]:
    """Every setting by name, for logs: secrets that are set show as `***`, and the password
    and query-string secrets of any URI are masked (`pipeline.uris.mask_uri`)."""
    from pipeline.uris import mask_uri

    out = {}
    for s in declared(type(obj)):
        value = _value(obj, s)
        if isinstance(value, tuple):
            value = tuple(mask_uri(v) for v in value)
        out[s.name] = "***" if s.secret and value else mask_uri(value)
    return out


def table(cls: type) -> str:
    """The settings as a Markdown table: flag, environment variable, default, meaning."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for s in declared(cls):
        if not s.listed:
            continue
        if s.default in (None, ()):
            shown = ""
        elif s.secret:
            shown = "(secret)"
        else:
            shown = f"`{s.default}`"
        lines.append(f"| `{s.flag}` | `{s.env}` | {shown} | {s.help} |")
    return "\n".join(lines)
