"""``a.b=c`` overrides typed by the dataclass fields, and configs to and from plain dicts (checkpoints, JSON)."""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Dict, List, Sequence, Tuple

from ideal_ray.config.schema import ConfigError


# ----------------------------------------------------------------------------------------- overrides
def _coerce(value: str, tp: Any, key: str, example: str = "") -> Any:
    """``value`` as the field type ``tp``; a value that does not parse is refused naming the override and, from
    ``example`` (the field's current value), one that would."""
    eg = f", e.g. {key}={example}" if example else ""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _coerce(value, args[0], key, example)
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"Override {key}={value} needs a boolean (true/false).")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"Override {key}={value} needs an integer{eg}.") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"Override {key}={value} needs a number{eg}.") from None
    if tp is str:
        return value
    if origin in (tuple, list, Tuple, List):
        args = typing.get_args(tp)
        elem = args[0] if args else str
        text = value.strip().strip("[]()")
        parts = [p.strip() for p in text.split(",") if p.strip()] if text else []
        try:
            items = [_coerce(p, elem, key) for p in parts]
        except ConfigError:  # name the whole value, not the one item
            kind = {int: "integers", float: "numbers"}.get(elem, "values")
            raise ConfigError(f"Override {key}={value} needs comma-separated {kind}{eg}.") from None
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis and len(args) != len(items):
            raise ConfigError(f"Override {key}={value} needs exactly {len(args)} comma-separated values{eg}.")
        return tuple(items) if origin in (tuple, Tuple) else items
    raise ConfigError(f"Override {key} has a type ({tp}) that cannot be set from the command line.")


def _show(v: Any) -> str:
    """A value as an override would write it: ``0.9,0.95`` for a tuple."""
    return ",".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Return a copy of ``cfg`` with each ``a.b=c`` override applied (values typed by the field)."""
    import difflib

    cfg = _deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key.sub=value.")
        key, value = item.split("=", 1)
        key = key.strip()
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"Override key '{key}' goes below a plain value at '{'.'.join(parts[:i])}'.")
            hints = typing.get_type_hints(type(node))
            names = [f.name for f in dataclasses.fields(node)]
            if part not in names:  # (a ClassVar is in the hints but no field)
                where = ".".join(parts[:i]) or "the config"
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"; the closest is {'.'.join(parts[:i] + close[:1])}" if close else ""
                raise ConfigError(f"Override key '{key}' is unknown: {where} has no field '{part}' (fields: "
                                  f"{', '.join(names)}){hint}.")
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(getattr(node, part)):
                    raise ConfigError(f"Override key '{key}' names a section; set one of its fields instead.")
                setattr(node, part, _coerce(value.strip(), hints[part], key, _show(getattr(node, part))))
            else:
                node = getattr(node, part)
    return cfg


def _deepcopy(cfg: Any) -> Any:
    import copy

    return copy.deepcopy(cfg)


def from_dict(cls: Any, data: Dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from :func:`dataclasses.asdict` output (e.g. a checkpoint)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, v = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            v = from_dict(tp, v)
        elif typing.get_origin(tp) in (tuple, Tuple) and v is not None:
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
