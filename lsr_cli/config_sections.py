"""Parsers of the config's sections (all but ``iterate:``, parsed in :mod:`.config`): each
validates one section of the YAML mapping and fills in its part of a :class:`~.config.Config`.

Unknown keys are rejected (:func:`~.config_values.parse_section`); every message names the key path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config_values import (
    parse_compile,
    parse_device,
    parse_dtype,
    parse_duration,
    parse_float,
    parse_int,
    parse_memory,
    parse_output_format,
    parse_rank,
    parse_section,
    parse_split,
    parse_str,
    parse_str_list,
    wrong_type,
)
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config, LsrConfig

__all__ = ["parse_data", "parse_free_sections", "parse_lsr", "parse_model", "parse_output", "parse_top_level"]


def parse_model(raw: dict[str, Any], cfg: Config) -> None:
    """``model:`` into ``cfg.model``."""
    m = parse_section("model", raw.get("model"), type(cfg.model))
    if "factory" in m:
        cfg.model.factory = parse_str("model.factory", m["factory"], optional=True)
    if "checkpoint" in m:
        cfg.model.checkpoint = parse_str("model.checkpoint", m["checkpoint"], optional=True)
    for name in ("key", "prefix"):
        if name in m:
            setattr(cfg.model, name, parse_str(f"model.{name}", m[name], optional=True) or None)
    if "trust_checkpoint" in m:
        if not isinstance(m["trust_checkpoint"], bool):
            raise wrong_type("model.trust_checkpoint", "true or false", m["trust_checkpoint"])
        cfg.model.trust_checkpoint = m["trust_checkpoint"]
    if "kwargs" in m:
        if m["kwargs"] is not None and not isinstance(m["kwargs"], dict):
            raise wrong_type("model.kwargs", "a mapping", m["kwargs"])
        cfg.model.kwargs = dict(m["kwargs"] or {})


def parse_data(raw: dict[str, Any], cfg: Config) -> None:
    """``data:`` into ``cfg.data``."""
    d = parse_section("data", raw.get("data"), type(cfg.data))
    for key in ("path", "val", "test"):
        if key in d:
            setattr(cfg.data, key, parse_str(f"data.{key}", d[key], optional=True))
    for key in ("train", "targets"):
        if key in d:
            setattr(cfg.data, key, parse_str(f"data.{key}", d[key]))
    if "inputs" in d:
        v = d["inputs"]
        if isinstance(v, list):
            if not v or not all(isinstance(x, str) for x in v):
                raise wrong_type("data.inputs", "a dataset name or a non-empty list of dataset paths", v)
            cfg.data.inputs = list(v)
        else:
            cfg.data.inputs = str(parse_str("data.inputs", v))
    if "shared" in d:
        cfg.data.shared = parse_str_list("data.shared", d["shared"])
        listed = cfg.data.inputs if isinstance(cfg.data.inputs, list) else [cfg.data.inputs]
        for name in cfg.data.shared:
            if name not in listed:
                raise ConfigError(f"config.data.shared: {name!r} is not one of config.data.inputs {listed}")
    if d.get("split") is not None:
        cfg.data.split = parse_split("data.split", d["split"])


def parse_lsr(raw: dict[str, Any], cfg: Config) -> None:
    """``lsr:`` (with ``lsr.parameters:``) into ``cfg.lsr``."""
    s = parse_section("lsr", raw.get("lsr"), type(cfg.lsr))
    lsr = cfg.lsr
    if "rank" in s:
        lsr.rank = parse_rank("lsr.rank", s["rank"])
    for key in ("start_rank", "max_rank", "tangent_chunk", "patience"):
        if key in s:
            setattr(lsr, key, parse_int(f"lsr.{key}", s[key], lo=1))
    for key in ("oversampling", "power_iterations"):
        if key in s:
            setattr(lsr, key, parse_int(f"lsr.{key}", s[key], lo=0))
    if "growth" in s:
        lsr.growth = parse_float("lsr.growth", s["growth"], lo=1.1, hi=16.0)
    if "holdout" in s:
        lsr.holdout = parse_float("lsr.holdout", s["holdout"], lo=0.0, hi=0.5)
    if "rise_tolerance" in s:
        lsr.rise_tolerance = parse_float("lsr.rise_tolerance", s["rise_tolerance"], lo=0.0, hi=10.0)
    if "truncation_rcond" in s:
        v = s["truncation_rcond"]
        lsr.truncation_rcond = "auto" if v == "auto" else parse_float("lsr.truncation_rcond", v, 0.0, 1.0)
    if "tikhonov" in s:
        v = s["tikhonov"]
        if v == "auto":
            lsr.tikhonov = "auto"
        elif isinstance(v, list):
            lsr.tikhonov = [parse_float(f"lsr.tikhonov[{i}]", x, 0.0, 1e6) for i, x in enumerate(v)]
        else:
            lsr.tikhonov = parse_float("lsr.tikhonov", v, 0.0, 1e6)
    if "row_chunk" in s:
        v = s["row_chunk"]
        lsr.row_chunk = "auto" if v == "auto" else parse_int("lsr.row_chunk", v, lo=1)
    if "max_memory" in s:
        lsr.max_memory = parse_memory("lsr.max_memory", s["max_memory"])
    if "time_limit" in s:
        lsr.time_limit = parse_duration("lsr.time_limit", s["time_limit"])
    if "jacobian" in s:
        if s["jacobian"] not in ("auto", "dense", "matrix_free"):
            raise ConfigError(f"config.lsr.jacobian: expected auto, dense or matrix_free, got {s['jacobian']!r}")
        lsr.jacobian = s["jacobian"]
    if "compile" in s:
        lsr.compile = parse_compile("lsr.compile", s["compile"])
    if "product_dtype" in s:
        if s["product_dtype"] not in ("auto", "float32", "float64"):
            raise ConfigError(
                f"config.lsr.product_dtype: expected auto, float32 or float64, got {s['product_dtype']!r}"
            )
        lsr.product_dtype = s["product_dtype"]
    if "loss" in s:
        if s["loss"] not in ("mse", "relative"):
            raise ConfigError(f"config.lsr.loss: expected mse or relative, got {s['loss']!r}")
        lsr.loss = s["loss"]
    if "exact" in s:
        if not isinstance(s["exact"], bool):
            raise wrong_type("lsr.exact", "true or false", s["exact"])
        lsr.exact = s["exact"]
    if "sketch_rows" in s:
        v = s["sketch_rows"]
        lsr.sketch_rows = "auto" if v == "auto" else parse_int("lsr.sketch_rows", v, lo=1)
    _parse_parameters(s.get("parameters"), lsr)


def _parse_parameters(raw: Any, lsr: LsrConfig) -> None:
    """``lsr.parameters:`` into ``lsr.parameters``."""
    p = parse_section("lsr.parameters", raw, type(lsr.parameters))
    if "include" in p:
        lsr.parameters.include = parse_str_list("lsr.parameters.include", p["include"])
    if "exclude" in p:
        lsr.parameters.exclude = parse_str_list("lsr.parameters.exclude", p["exclude"])
    if "fraction" in p:
        frac = parse_float("lsr.parameters.fraction", p["fraction"], 0.0, 1.0)
        if frac <= 0.0:
            raise ConfigError(f"config.lsr.parameters.fraction: must be in (0, 1], got {frac}")
        lsr.parameters.fraction = frac


def parse_free_sections(raw: dict[str, Any], cfg: Config) -> None:
    """``pde:`` and ``instances:``, kept as mappings (validated by :mod:`.pde`)."""
    if raw.get("pde") is not None:
        if not isinstance(raw["pde"], dict):
            raise wrong_type("pde", "a mapping", raw["pde"])
        cfg.pde = dict(raw["pde"])
    if raw.get("instances") is not None:
        if not isinstance(raw["instances"], dict):
            raise wrong_type("instances", "a mapping", raw["instances"])
        cfg.instances = dict(raw["instances"])


def parse_output(raw: dict[str, Any], cfg: Config) -> None:
    """``output:`` into ``cfg.output``."""
    o = parse_section("output", raw.get("output"), type(cfg.output))
    for key in ("checkpoint", "report"):
        if key in o:
            setattr(cfg.output, key, parse_str(f"output.{key}", o[key], optional=True))
    if o.get("format") is not None:
        cfg.output.format = parse_output_format("output.format", o["format"])


def parse_top_level(raw: dict[str, Any], cfg: Config) -> None:
    """The top-level keys ``dtype``, ``device`` and ``seed``."""
    if "dtype" in raw:
        cfg.dtype = parse_dtype("dtype", raw["dtype"])
    if "device" in raw:
        cfg.device = parse_device("device", raw["device"])
    if "seed" in raw:
        cfg.seed = parse_int("seed", raw["seed"], lo=0)
