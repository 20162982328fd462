"""The config machinery: settings are declared once, as typed dataclasses; everything else is derived.

A setting is a dataclass field made with `setting(default, help, ...)`. From the declaration come:
- YAML keys (`section.field`, nested mappings), checked by name and type (`apply`);
- environment variables `<PREFIX>SECTION__FIELD` (`env_overrides`);
- CLI flags (`add_flags`): `--section-field` (or the field's own `flag=`), booleans as `--x/--no-x`, the help
  text and the true default shown once, from the declaration;
- the precedence `defaults < --config file.yaml < environment < CLI flags` (`load`).

A config class may define `validate(self) -> self` for cross-field rules; errors are `ConfigError`s that name
the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core import envs
from core.errors import ConfigError

T = TypeVar("T")
_FLAG_DEST = "cfg:"  # argparse dest prefix of derived flags


def setting(default: Any, help: str, *, flag: str | bool | None = None, choices: tuple | None = None) -> Any:
    """A documented setting. `flag`: a flag name instead of the derived `--section-field`, or False for none.
    `choices`: the allowed values (checked on load, listed in --help)."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested settings section (a dataclass field holding another config dataclass)."""
    return field(default_factory=cls)


# ------------------------------------------------------------------------------------------------ applying
def _optional(tp: Any) -> Any | None:
    """X for `X | None` / Optional[X], else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def coerce(tp: Any, value: Any, where: str) -> Any:
    inner = _optional(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return coerce(inner, value, where)
    origin = typing.get_origin(tp) or tp
    try:
        if origin is Path:
            return Path(value).expanduser()
        if origin is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if origin is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if origin in (int, float, str):
            if isinstance(value, bool) and origin is not str:
                raise ValueError(value)
            return origin(value)
        if origin in (list, dict):
            v = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(v, origin):
                raise ValueError(value)
            return v
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(origin, '__name__', origin)}") from exc
    return value


def apply(obj: Any, values: dict, where: str = "") -> None:
    """Apply a nested dict onto a config dataclass, checking names, types and declared choices."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        path = f"{where}{k}"
        if k not in fields:
            raise ConfigError(f"unknown setting {path!r}; known: {', '.join(sorted(fields))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping")
            apply(cur, value, path + ".")
            continue
        v = coerce(hints[k], value, path)
        choices = fields[k].metadata.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, choices))}, got {v!r}")
        setattr(obj, k, v)


def env_overrides(prefix: str) -> dict:
    """`<PREFIX>SECTION__FIELD=value` variables as a nested dict (names lower-cased)."""
    out: dict = {}
    for name, value in envs.with_prefix(prefix).items():
        parts = [p.lower() for p in name[len(prefix):].split("__") if p]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if parts:
            node[parts[-1]] = value
    return out


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML config file's top-level mapping, or a ConfigError saying what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load(cls: type[T], *, config_file: str | Path | None = None, env_prefix: str = "",
         overrides: dict | None = None, base: dict | None = None, section_of_file: str = "",
         other_sections: tuple[str, ...] = ()) -> T:
    """defaults < `base` (e.g. a profile) < YAML file < environment < overrides (CLI flags), then validate().
    One file may configure several processes: `section_of_file` reads only that top-level key of the file;
    `other_sections` are top-level keys owned by other processes, skipped here."""
    cfg = cls()
    from_file = None
    if config_file:
        data = read_yaml_mapping(config_file)
        if section_of_file:
            from_file = data.get(section_of_file) or {}
            if not isinstance(from_file, dict):
                raise ConfigError(f"{section_of_file} in {config_file} must be a mapping")
        else:
            from_file = {k: v for k, v in data.items() if k not in other_sections}
    for layer in (base, from_file,
                  env_overrides(env_prefix) if env_prefix else None, overrides):
        if layer:
            apply(cfg, layer)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


# ---------------------------------------------------------------------------------------------- CLI flags
@dataclass
class _Leaf:
    path: str          # "backend.max_loras"
    tp: Any
    default: Any
    meta: Any


def _leaves(cls: type, prefix: str = "") -> list[_Leaf]:
    out: list[_Leaf] = []
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        cur = getattr(inst, f.name)
        if dataclasses.is_dataclass(cur):
            out.extend(_leaves(type(cur), f"{prefix}{f.name}."))
        else:
            out.append(_Leaf(f"{prefix}{f.name}", hints[f.name], cur, f.metadata))
    return out


def _flag_name(leaf: _Leaf) -> str:
    parts = leaf.path.split(".")
    if parts[-1] == "enabled" and len(parts) > 1:
        parts = parts[:-1]  # `--classifier / --no-classifier`
    return "--" + "-".join(parts).replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting of `cls` (nested sections included), help and default from the declaration.
    A flag not given leaves the setting to the lower layers (file, environment, default)."""
    group = parser.add_argument_group(f"settings ({cls.__name__}; also YAML keys and environment variables)")
    for leaf in _leaves(cls):
        flag = leaf.meta.get("flag")
        if flag is False or leaf.path in skip:
            continue
        name = flag or _flag_name(leaf)
        tp = _optional(leaf.tp) or leaf.tp
        origin = typing.get_origin(tp) or tp
        shown = leaf.default if leaf.default not in ("", [], {}, None) else "(empty)"
        help_text = f"{leaf.meta.get('help', '')} [{leaf.path}; default: {shown}]".replace("%", "%%")
        kw: dict = dict(dest=_FLAG_DEST + leaf.path, default=argparse.SUPPRESS, help=help_text)
        if origin is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = "YAML" if origin in (list, dict) else origin.__name__.upper()
            if leaf.meta.get("choices"):
                kw["choices"] = leaf.meta["choices"]
                kw["type"] = origin
                kw.pop("metavar")
        group.add_argument(name, **kw)


def add_hidden_alias(parser: argparse.ArgumentParser, alias: str, path: str) -> None:
    """A deprecated spelling `alias` of the flag `add_flags` made for setting `path`: same destination, type and
    choices, accepted but not shown in --help (old scripts keep working while the help shows one name)."""
    dest = _FLAG_DEST + path
    act = next((a for a in parser._actions if a.dest == dest), None)
    if act is None:
        raise ValueError(f"no flag for setting {path!r} in this parser (call add_flags first)")
    kw: dict = dict(dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    if isinstance(act, argparse.BooleanOptionalAction):
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw.update(type=act.type, choices=act.choices, metavar=act.metavar)
    parser.add_argument(alias, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The settings given as derived flags, as a nested dict for `load(overrides=...)`."""
    out: dict = {}
    for dest, value in vars(args).items():
        if not dest.startswith(_FLAG_DEST):
            continue
        parts = dest[len(_FLAG_DEST):].split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def describe(cls: type) -> list[tuple[str, str, Any]]:
    """(YAML key, help, default) of every setting: the reference table in the docs is generated from this."""
    return [(leaf.path, leaf.meta.get("help", ""), leaf.default) for leaf in _leaves(cls)]
