"""Typed run configurations: dataclasses whose fields carry their help text, loaded from a YAML
file and overridden by command-line flags generated from the same fields (so every option is in
``--help``), with errors that name the key and the file."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 (argparse's name)
    """A config field with its help text; a list/dict default is copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it and its source."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(kind: Any) -> tuple[Any, bool]:
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(get_args(kind)) == 2:
            return args[0], True
    return kind, False


def coerce(kind: Any, value: Any, where: str) -> Any:
    """``value`` as the field type ``kind`` (bool, int, float, str, Literal, list[...],
    dict[str, str], optional), or a ConfigError naming ``where``."""
    kind, optional = _strip_optional(kind)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                         and optional):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required (got none)")
    origin = get_origin(kind)
    if origin is Literal:
        choices = get_args(kind)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}; "
                              f"got {value!r}")
        return value
    if origin in (list, tuple):
        (item,) = get_args(kind)[:1]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            value = {}
            for p in pairs:
                if "=" not in p:
                    raise ConfigError(f"{where}: expected name=value[,name=value...], got {p!r}")
                name, _, item = p.partition("=")
                value[name.strip()] = item.strip()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config field type {kind!r} at {where}")


def from_mapping(cls: type[T], values: dict[str, Any], source: str) -> T:
    """A ``cls`` from ``values`` (keys with '-' or '_'); unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            hint = _similar(name, list(fields))
            raise ConfigError(f"{source}: unknown option {key!r}{hint}")
        kwargs[name] = coerce(hints[name], value, f"{source}: {key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def _similar(name: str, known: list[str]) -> str:
    """The hint ``" (similar: a, b)"`` naming the known names that look like a typo of
    ``name`` or share its first word; "" when none does."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.7)
    close += [k for k in known if k.split("_")[0] == name.split("_")[0] and k not in close]
    return f" (did you mean {', '.join(close[:5])}?)" if close else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of option: value")
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, group: str | None = None) -> None:
    """One ``--flag`` per field of ``cls``, defaulting to "not given" so that the YAML file's
    value stands unless the flag is passed."""
    target = parser.add_argument_group(group) if group else parser
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        kind, _ = _strip_optional(hints[f.name])
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory())  # type: ignore[misc]
        text = f.metadata.get("help", "")
        if get_origin(kind) is Literal:
            text += f" [{'|'.join(map(str, get_args(kind)))}]"
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        if isinstance(default, dict):
            shown = ",".join(f"{k}={v}" for k, v in default.items()) or "{}"
        metavar = "BOOL" if kind is bool else f.name.upper()
        target.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg__{f.name}",
                            default=argparse.SUPPRESS, metavar=metavar,
                            help=f"{text} (default: {shown})".replace("%", "%%"))


def from_sources(classes: Sequence[type], args: argparse.Namespace, *,
                 config_path: str | None) -> tuple[tuple[Any, ...], set[str]]:
    """One instance of each config class (their field names distinct, their flags added by
    ``add_arguments``): the defaults, then the YAML file's values, then the flags given. A bad
    key or value is a ConfigError naming it and where it came from (the file, or
    ``command line: --flag``). Also returns the names the file or the flags set."""
    owner = {name: cls for cls in classes for name in cls.__dataclass_fields__}
    hints = {name: kind for cls in classes for name, kind in _hints(cls).items()}
    values: dict[str, Any] = {}
    if config_path:
        for key, value in load_yaml(config_path).items():
            # one spelling per key, so that a flag replaces the file's value whether the file
            # wrote batch-size or batch_size
            name = str(key).replace("-", "_")
            if name not in owner:
                raise ConfigError(f"{config_path}: unknown option {key!r}"
                                  f"{_similar(name, list(owner))}")
            values[name] = coerce(hints[name], value, f"{config_path}: {key}")
    flags = [dest[len("cfg__"):] for dest in vars(args) if dest.startswith("cfg__")]
    for name in flags:
        values[name] = coerce(hints[name], getattr(args, f"cfg__{name}"),
                              f"command line: --{name.replace('_', '-')}")
    source = " and ".join(filter(None, [config_path, "command line" if flags else None]))
    built = tuple(from_mapping(cls, {k: v for k, v in values.items() if owner[k] is cls},
                               source or "defaults") for cls in classes)
    return built, set(values)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
