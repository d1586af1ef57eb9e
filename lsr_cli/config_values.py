"""Validators of single config values: each takes the key path and the raw YAML value, returns
the typed value, and raises :class:`~.errors.ConfigError` naming the key (``config.lsr.rank``),
what was expected and what was found.

:func:`parse_section` checks a section's keys against its dataclass (the closest valid key is
suggested); :mod:`.config` assembles the sections into a :class:`~.config.Config`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import fields
from typing import Any

from .errors import ConfigError

__all__ = [
    "DEVICE_PATTERN",
    "DTYPES",
    "OUTPUT_FORMATS",
    "SPLIT_NAMES",
    "check_keys",
    "parse_compile",
    "parse_device",
    "parse_dtype",
    "parse_duration",
    "parse_float",
    "parse_int",
    "parse_memory",
    "parse_output_format",
    "parse_rank",
    "parse_section",
    "parse_split",
    "parse_str",
    "parse_str_list",
    "type_name",
    "wrong_type",
]

DTYPES = ("float64", "float32")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
OUTPUT_FORMATS = ("torchscript", "export", "state-dict", "safetensors")
SPLIT_NAMES = ("train", "val", "test")


def type_name(value: Any) -> str:
    """How a message names the YAML type of ``value`` (``an integer``, ``a list``, ``null``)."""
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def wrong_type(path: str, expected: str, value: Any) -> ConfigError:
    """The error for ``config.<path>`` holding ``value`` where ``expected`` was expected."""
    return ConfigError(f"config.{path}: expected {expected}, got {type_name(value)} ({value!r})")


def parse_int(path: str, value: Any, lo: int | None = None) -> int:
    """An integer (not a boolean), at least ``lo``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(path, "an integer", value)
    if lo is not None and value < lo:
        raise ConfigError(f"config.{path}: must be at least {lo}, got {value}")
    return value


def parse_float(path: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """A number (not a boolean) between ``lo`` and ``hi``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong_type(path, "a number", value)
    value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"config.{path}: must be between {lo} and {hi}, got {value}")
    return value


def parse_str(path: str, value: Any, optional: bool = False) -> str | None:
    """A string (or ``null`` when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise wrong_type(path, "a string" + (" or null" if optional else ""), value)
    return value


def parse_str_list(path: str, value: Any) -> list[str]:
    """A list of strings; a single string is a list of one, ``null`` an empty list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wrong_type(path, "a list of strings", value)
    return list(value)


def parse_rank(path: str, value: Any) -> int | list[int] | str:
    """``"auto"``, a positive integer, or a list of positive integers (a sweep)."""
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return "auto"
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"config.{path}: expected 'auto', an integer or a comma-separated list of integers, got {value!r}"
            ) from None
        value = nums[0] if len(nums) == 1 else nums
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"config.{path}: the rank list is empty")
        ranks = [parse_int(f"{path}[{i}]", v) for i, v in enumerate(value)]
        for r in ranks:
            if r < 1:
                raise ConfigError(f"config.{path}: ranks must be at least 1, got {r}")
        return sorted(set(ranks))
    r = parse_int(path, value)
    if r < 1:
        raise ConfigError(f"config.{path}: must be at least 1 (or 'auto'), got {r}")
    return r


def check_keys(path: str, raw: dict[str, Any], cls: type) -> None:
    """Reject a key of ``raw`` that is not a field of the dataclass ``cls``, suggesting the closest."""
    valid = [f.name for f in fields(cls)]
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            where = f"config.{path}.{key}" if path else f"config.{key}"
            raise ConfigError(f"{where}: unknown key{hint}")


def parse_section(path: str, raw: Any, cls: type) -> dict[str, Any]:
    """The mapping of section ``path`` (``null``: empty) with its keys checked against ``cls``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise wrong_type(path, "a mapping", raw)
    check_keys(path, raw, cls)
    return raw


def parse_split(path: str, value: Any) -> dict[str, Any]:
    """``{train: 0.8, val: 0.1, test: 0.1, seed: 0}`` (fractions summing to at most 1) or
    ``{train: [0, 800], val: [800, 900]}`` (row ranges ``[start, stop)``, not overlapping)."""
    if not isinstance(value, dict):
        raise wrong_type(path, "a mapping such as {train: 0.8, val: 0.1, test: 0.1}", value)
    for name in value:
        if name not in (*SPLIT_NAMES, "seed"):
            raise ConfigError(f"config.{path}.{name}: unknown key; valid keys: train, val, test, seed")
    if "train" not in value:
        raise ConfigError(f"config.{path}: needs a 'train' entry")
    out: dict[str, Any] = {"seed": parse_int(f"{path}.seed", value.get("seed", 0), lo=0)}
    parts = {k: v for k, v in value.items() if k in SPLIT_NAMES and v is not None}
    if all(isinstance(v, list) for v in parts.values()):
        spans = []
        for name, v in parts.items():
            if len(v) != 2:
                raise wrong_type(f"{path}.{name}", "a row range [start, stop]", v)
            start, stop = parse_int(f"{path}.{name}[0]", v[0], lo=0), parse_int(f"{path}.{name}[1]", v[1], lo=0)
            if stop <= start:
                raise ConfigError(f"config.{path}.{name}: the range [{start}, {stop}] holds no row")
            spans.append((start, stop, name))
            out[name] = [start, stop]
        spans.sort()
        for (_, stop_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < stop_a:
                raise ConfigError(f"config.{path}: the ranges of {a} and {b} overlap")
        return out
    for name, v in parts.items():
        frac = parse_float(f"{path}.{name}", v, 0.0, 1.0)
        if frac <= 0.0:
            raise ConfigError(f"config.{path}.{name}: must be in (0, 1], got {frac}")
        out[name] = frac
    total = sum(out[n] for n in SPLIT_NAMES if n in out)
    if total > 1.0 + 1e-9:
        raise ConfigError(f"config.{path}: the fractions add up to {total:g}, more than 1")
    return out


def parse_output_format(path: str, value: Any) -> str:
    """``torchscript``, ``export``, ``state-dict`` (``state_dict`` accepted) or ``safetensors``."""
    if value == "state_dict":
        value = "state-dict"
    if value not in OUTPUT_FORMATS:
        raise ConfigError(f"config.{path}: expected one of {', '.join(OUTPUT_FORMATS)}, got {value!r}")
    return str(value)


def parse_dtype(path: str, value: Any) -> str:
    """``float64`` or ``float32``."""
    if value not in DTYPES:
        raise ConfigError(f"config.{path}: expected one of {', '.join(DTYPES)}, got {value!r}")
    return str(value)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse_compile(where: str, v: Any) -> str | None:
    """``false`` (off), ``true`` (``inductor``) or a backend name (inductor, aot_eager)."""
    backends = ("inductor", "aot_eager")
    if v is False or v is None:
        return None
    if v is True:
        return "inductor"
    if isinstance(v, str) and v in backends:
        return v
    raise ConfigError(f"config.{where}: expected true, false or one of {', '.join(backends)}, got {v!r}")


def parse_memory(path: str, value: Any) -> int | str:
    """``"auto"``, a byte count, or a size such as ``"512MB"``, ``"2GiB"``, ``"1.5GB"``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ConfigError(f"config.{path}: expected 'auto' or a size such as 2GB, got {value!r}")
    if isinstance(value, int | float):
        num, unit = float(value), ""
    else:
        m = _SIZE_PATTERN.match(str(value).lower())
        if m is None or m.group(2) not in _SIZE_UNITS:
            raise ConfigError(
                f"config.{path}: expected 'auto' or a size such as 512MB, 2GiB or a byte count, got {value!r}"
            )
        num, unit = float(m.group(1)), m.group(2)
    size = int(num * _SIZE_UNITS[unit])
    if size < 2**20:
        raise ConfigError(f"config.{path}: must be at least 1 MiB, got {value!r} ({size} bytes)")
    return size


_DURATION_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}
_DURATION_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


def parse_duration(path: str, value: Any) -> float | None:
    """``null``, seconds, or ``"90s"``, ``"10min"``, ``"1.5h"`` → seconds (at least 1)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"config.{path}: expected seconds or a duration such as 10min, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_PATTERN.match(str(value).lower())
        if m is None or m.group(2) not in _DURATION_UNITS:
            raise ConfigError(
                f"config.{path}: expected seconds or a duration such as 90s, 10min or 1.5h, got {value!r}"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds < 1.0:
        raise ConfigError(f"config.{path}: must be at least 1 second, got {value!r}")
    return seconds


def parse_device(path: str, value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value):
        raise ConfigError(f"config.{path}: expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value
