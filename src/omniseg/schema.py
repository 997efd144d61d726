"""Checking settings against their declaration: every config section is a dataclass, and a key or value
that the dataclass does not declare is refused before anything runs, naming where it came from and the
nearest valid key.

The dataclasses (omniseg/settings.py for data and training, models/<family>/family.py for each model
family) are the one place where a setting and its default are written. This module knows nothing of
them: it walks plain dicts against any dataclass. Field metadata `choices=(...)` lists the allowed
values of a setting; a `Dict[...]` or `Any` field is free-form (e.g. keyword arguments for timm).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, value outside its choices. The message names
    the key, where it came from (file, override, mapping) and, for a mistyped key, the nearest valid one."""


def choice(default: Any, choices: Sequence[Any], doc: str = "") -> Any:
    """A dataclass field whose value must be one of `choices`."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), "doc": doc})


def suggestion(word: str, candidates: Sequence[str]) -> str:
    """' (did you mean x?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def nested_schema(cls: type, key: str) -> type | None:
    """The dataclass type of field `key` of `cls` (a nested section), or None for a leaf / free-form field."""
    tp = _unwrap_optional(typing.get_type_hints(cls)[key])
    return tp if dataclasses.is_dataclass(tp) else None


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(node: Mapping, cls: type, *, prefix: str, source: str,
               tolerate: Mapping[str, Any] | None = None) -> list[str]:
    """Raise ConfigError for the first key of `node` (recursively) that `cls` does not declare.

    `prefix` is the dotted path of `node` ("model."), `source` says where it came from. `tolerate` is a
    nested dict of keys that may appear although `cls` lacks them (settings an older omniseg wrote into
    every config); those are returned as dotted paths instead of refused, for the caller to drop."""
    names = field_names(cls)
    tolerated: list[str] = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in names:
            if isinstance(tolerate, Mapping) and key in tolerate:
                tolerated.append(path)
                continue
            hint = suggestion(str(key), names) or f"; {prefix.rstrip('.') or 'a config'} has {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key {path}{hint}")
        sub = nested_schema(cls, key)
        if sub is not None and isinstance(value, Mapping):
            inner = tolerate.get(key) if isinstance(tolerate, Mapping) else None
            tolerated += check_keys(value, sub, prefix=f"{path}.", source=source, tolerate=inner)
    return tolerated


def drop_paths(node: dict, paths: Sequence[str], prefix: str = "") -> None:
    """Remove the dotted `paths` (relative to `prefix`) from a nested dict, in place."""
    for path in paths:
        parts = path[len(prefix):].split(".")
        parent = node
        for p in parts[:-1]:
            parent = parent.get(p) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(parts[-1], None)


def check_choices(node: Any, cls: type, *, prefix: str, source: str | Callable[[str], str]) -> None:
    """Raise ConfigError where a field with metadata `choices` holds another value. `node` is a dataclass
    instance, a Mapping or an OmegaConf DictConfig of `cls`; missing (???) and interpolated values are
    left to run time. `source` names where the settings came from, or maps a dotted key to that."""
    for f in dataclasses.fields(cls):
        value = _read(node, f.name)
        if value is _UNSET:
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            path = f"{prefix}{f.name}"
            where = source(path) if callable(source) else source
            raise ConfigError(f"{where}: {path} must be one of {', '.join(map(repr, choices))}, "
                              f"got {value!r}{suggestion(str(value), [str(c) for c in choices])}")
        sub = nested_schema(cls, f.name)
        if sub is not None and value is not None:
            check_choices(value, sub, prefix=f"{prefix}{f.name}.", source=source)


_UNSET = object()


def _read(node: Any, name: str) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        if name not in node or OmegaConf.is_missing(node, name) or OmegaConf.is_interpolation(node, name):
            return _UNSET
        return node[name]
    if isinstance(node, Mapping):
        return node.get(name, _UNSET)
    return getattr(node, name, _UNSET)


def instantiate(cls: type, mapping: Mapping | None, *, prefix: str, source: str):
    """A dataclass instance of `cls` from a (partial) mapping: unknown keys, wrong types and values outside
    their choices raise ConfigError; missing keys take the declared defaults."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data = OmegaConf.to_container(mapping, resolve=True) if OmegaConf.is_config(mapping) else dict(mapping or {})
    check_keys(data, cls, prefix=prefix, source=source)
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), data)
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{source}: {prefix}{getattr(e, 'full_key', '') or ''}: {msg}") from None
    except ValueError as e:  # a dataclass's own check (__post_init__)
        raise ConfigError(f"{source}: {e}") from None
    check_choices(obj, cls, prefix=prefix, source=source)
    return obj
