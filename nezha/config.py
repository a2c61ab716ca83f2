"""One config dataclass per entry point: defaults in code, a YAML file on top, CLI flags on top of that.

`parse_config(TrainConfig, argv)` builds an argparse parser from the dataclass fields, so every field is
`--field-name VALUE` on the command line and `field_name: value` in YAML; `--config FILE.yaml` loads a
file first. Unknown YAML keys are an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message says which and why."""


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X`, `X | None`, `Optional[X]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    base, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: may not be null")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(base) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        items = [_coerce(name, inner, v) for v in value]
        return tuple(items) if origin is tuple else items
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if base in (int, float, str):
        if base is str and optional and str(value).lower() in ("none", "null"):
            return None
        try:
            return base(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {base.__name__}, got {value!r}") from None
    if base is dict or typing.get_origin(base) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a mapping, coercing types; unknown keys raise ConfigError."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add `--config` and one `--field-name` flag per dataclass field (all default to 'not given')."""
    parser.add_argument("--config", help="YAML file with any of the fields below (CLI flags override it)")
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        base, _ = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        help_text = (field.metadata.get("help", "") + f" (default: {default})").strip()
        if base is bool:
            parser.add_argument(flag, dest=field.name, default=None, nargs="?", const="true", help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, default=None, help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return from_dict(cls, values, source=getattr(args, "config", None) or "flags")


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    add_config_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        return config_from_args(cls, args)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
