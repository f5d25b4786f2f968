"""Config files whose keys mirror a command's flags (`code-size` or `code_size`).

Values from the file become the command's defaults, so flags on the command line still win.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from pipeline.errors import ConfigError, one_line

__all__ = ["load_config_file"]


def _loader():
    """YAML's safe loader refusing a key given twice in one table (TOML refuses it itself): the
    last one would win, silently."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a config file and map its keys (`code-size` or `code_size`) to parser dests."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError("config", f"{path}: no such file")
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError("config", f"{path}: use a .toml, .yaml or .yml file")
    import yaml

    try:
        text = file.read_bytes().decode()
        raw = tomllib.loads(text) if suffix == ".toml" else yaml.load(text, _loader()) or {}
    except UnicodeDecodeError as exc:
        detail = f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError("config", detail) from None
    except yaml.MarkedYAMLError as exc:  # one line: where, and what
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError("config", f"{path}: {where}{exc.problem or exc.context}") from None
    except (yaml.YAMLError, ValueError) as exc:  # (TOMLDecodeError is a ValueError)
        raise ConfigError("config", f"{path}: {one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path}: expected a table of settings")
    dests = {a.dest: a for a in parser._actions}
    by_flag = {s.lstrip("-"): a.dest for a in parser._actions for s in a.option_strings}
    values, keys = {}, {}
    for key, value in raw.items():
        dest = by_flag.get(str(key)) or by_flag.get(str(key).replace("_", "-"))
        if dest is None or dest in ("config", "help"):
            raise ConfigError(f"config: {key}", f"unknown setting in {path}")
        if dest in keys:  # `code-size` and `code_size`: the last one won, silently
            raise ConfigError(f"config: {key}", f"the same setting as {keys[dest]!r} in {path}")
        keys[dest] = key
        action = dests[dest]
        if isinstance(value, dict):  # a table where a value belongs: was a traceback later
            raise ConfigError(f"config: {key}", "takes a value, not a table")
        if action.nargs == 0:  # an on/off flag: a quoted "false" would have turned it on
            if not isinstance(value, bool):
                raise ConfigError(f"config: {key}", f"{value!r} is not true or false")
            value = action.const if value else action.default
        elif isinstance(value, bool):  # `window = true` would have been taken as 1
            raise ConfigError(f"config: {key}", f"takes a value, not {str(value).lower()}")
        elif isinstance(value, list | tuple):
            if any(isinstance(v, dict | list | tuple) for v in value):
                raise ConfigError(
                    f"config: {key}", "takes a list of values, not of tables or lists"
                )
            value = ",".join(str(v) for v in value)
        elif action.type is None:
            value = value if value is None or isinstance(value, str) else str(value)
        else:
            # a number as the command line would give it: int(16.9) would be 16, int(inf) raise
            given = repr(value) if isinstance(value, float) else value
            try:
                value = action.type(given)
            except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError):
                raise ConfigError(f"config: {key}", f"invalid value {value!r}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"config: {key}", f"{value!r} is not one of {list(action.choices)}")
        values[dest] = value
    return values
