"""Reading a `Config`: YAML file, then dotted overrides, each value checked against its field's type.

Unknown keys are errors naming the nearest valid key; overrides (`tracker.rho_min=0.9`) are parsed
as YAML scalars; a file that is not UTF-8 YAML is one error naming the file.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import yaml

from spo_agents.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from spo_agents.config import Config

T = typing.TypeVar("T")
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(
            f"`{where}` must be {_type_name(tp)}, got {value!r}.{did_you_mean(str(value), map(str, get_args(tp)))}"
        )
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
        raise ConfigError(f"`{where}` must be {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` must be a mapping of its fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{where}` must be a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-6` (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"`{where}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            raise ConfigError(
                f"unknown config key `{path}`.{did_you_mean(str(key), names)} Valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"invalid config for `{where or cls.__name__}`: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested mapping (values parsed as YAML scalars)."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` must look like `section.key=value`, e.g. `tracker.rho_min=0.9`")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override `{item}`: cannot parse value {raw!r} ({e})") from e
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override `{item}`: `{p}` is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path` (if any), then dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file `{p}` does not exist; shipped configs live in `configs/`")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file `{p}` is not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r}); "
                "save it as UTF-8, or start from one of the files in `configs/`"
            ) from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file `{p}` is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file `{p}` must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    from spo_agents.config import Config

    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
