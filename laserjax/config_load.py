"""Loading a `Config`: a YAML file plus `section.key=value` overrides, a nested mapping, or a
command's flags, each value coerced to its field's type and the result validated at construction
(`laserjax.config` holds the schema and its checks; this module reads values into it).

The flag helpers let a command take a config field as a flag with the config's default, type and
choices (`add_config_flag`, `field_default`), build the config from its flags (`set_field`,
`build_config`) and name the flag a ConfigError is about (`flag_for`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import types
import typing
from typing import Any, Literal

import yaml
from etils import epath

from laserjax.config import Config, ConfigError

# Type coercion is hand-written here, in one place (`_coerce` / `_build`), rather than taken from
# a library: pydantic is not a dependency of anything laserjax installs (it is present on some
# machines only through unrelated tools) and would wrap the ConfigErrors raised in __post_init__
# into its own ValidationError, so every one-line `config field `x`: ...` message would need
# translating back; dacite converts nested dataclasses but not the comma-separated tuples, the
# "true"/"off" booleans or the Optional sections (`model.toy`) the overrides need. Both would add
# a dependency to replace ~70 lines while keeping a translation layer of similar size.


def _section_type(tp: Any) -> type | None:
    """The dataclass of a section field (`ToyConfig | None` included), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(options) == 1:
        return options[0] if dataclasses.is_dataclass(options[0]) else None
    return None


def _coerce(tp: Any, value: Any, field: str) -> Any:
    """A YAML / override value as the field's type: the one place types are converted."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    section = _section_type(tp)
    if section is not None:
        if value is None and type(None) in args:
            return None
        if not isinstance(value, dict):
            raise ConfigError.for_field(field, "expected a section (mapping)")
        return _build(section, value, f"{field}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, field)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if origin is Literal:
        if value not in args:
            raise ConfigError.for_field(field, f"{value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(args[0], v, field) for v in value if v != "")
    if tp is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError.for_field(field, f"expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if tp is not str and isinstance(value, bool):
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError.for_field(field, f"expected {tp.__name__}, got {value!r}") from None
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError.for_field(
                name,
                f"unknown field; known fields of `{prefix.rstrip('.') or 'config'}`: "
                f"{', '.join(fields)}",
            )
        kwargs[key] = _coerce(hints[key], value, name)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override `{dotted}`: `{p}` is not a section", dotted)
    node[leaf] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of the config, e.g. for `config.yaml` in the run directory."""
    out = dataclasses.asdict(cfg)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return [fix(v) for v in x]
        return x

    return fix(out)


def load_config(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config and apply `section.key=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = epath.Path(path)  # keeps a URL intact: a run's config.yaml may be on gs://
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r}: write it as section.key=value, "
                "e.g. laser.alpha=0.05 or algorithm=grpo"
            )
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return _build(Config, data, "")


def build_config(data: dict[str, Any]) -> Config:
    """A Config from a nested mapping (YAML's shape), through the same coercion and checks as
    `load_config`."""
    return _build(Config, data, "")


def _field(field: str) -> tuple[Any, Any]:
    """(type, default) of a dotted config field, e.g. `tokens.self_reward_token_id`."""
    cls: Any = Config
    *sections, leaf = field.split(".")
    for name in sections:
        cls = _section_type(typing.get_type_hints(cls)[name])
    f = {f.name: f for f in dataclasses.fields(cls)}[leaf]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return typing.get_type_hints(cls)[leaf], default


def field_default(field: str) -> Any:
    """The default of a dotted config field, e.g. `tokens.self_reward_token_id` -> 151652."""
    return _field(field)[1]


def add_config_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    field: str,
    help: str | None = None,
    **kwargs: Any,
) -> None:
    """A command's flag that sets the config field `field`, with the field's default (written
    once, in `laserjax.config`) and type (`float | str` ones, such as `laser.c_ref`, parse as
    YAML); Literal fields offer their values as choices."""
    tp, field_default = _field(field)
    # default=None: the command fills the flag later (e.g. from a laserjax export's
    # laserjax.json), falling back to the field's default.
    default = kwargs.pop("default", field_default)
    shown = (
        field_default if default is not None else f"the model's laserjax.json, else {field_default}"
    )
    if tp in (int, float, str):
        kwargs.setdefault("type", tp)
    elif typing.get_origin(tp) is Literal:
        kwargs.setdefault("choices", typing.get_args(tp))
    else:
        kwargs.setdefault("type", lambda text: yaml.safe_load(text) if text.strip() else text)
    parser.add_argument(
        flag,
        default=default,
        help=f"{help + ' ' if help else ''}(config {field}; default {shown})",
        **kwargs,
    )


def set_field(data: dict[str, Any], field: str, value: Any) -> None:
    """Set a dotted field in a nested mapping (the shape `build_config` takes)."""
    _set_dotted(data, field, value)


def flag_for(error: ConfigError, flags: dict[str, str]) -> str | None:
    """The command flag (in `flags`: flag -> config field) that set the field a ConfigError
    names, or None: the error's `field`, then each section above it."""
    fields = {field: flag for flag, field in flags.items()}
    name = error.field or ""
    while name:
        if name in fields:
            return fields[name]
        name = name.rpartition(".")[0]
    return None
