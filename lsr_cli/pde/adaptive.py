"""Residual-based adaptive collocation: points added where the refined predictor's residual is
largest, then the one-shot step solved again.

A PINN trained elsewhere comes with that library's point set. LSR can drive the exact residual
at those points to round-off while the predictor stays wrong between them (measured on a Burgers
PINN: 3e-7 at the fit points, 4e-3 at fresh points, where a shock is under-resolved). When the
validation loss (:mod:`.validation`) is more than :data:`TRIGGER` times the fit loss, each round:

1. draws a dense seeded candidate set for every ``pde`` block (the validation rules with their own
   seed, ``CANDIDATE_FACTOR`` times the block's points, at most :data:`CANDIDATE_MAX`);
2. evaluates the refined predictor's exact residual there and samples as many new points as the
   block has (at most :data:`ADD_MAX`) with probability ``∝ |r| / mean|r| + 1`` — residual-based
   adaptive distribution (RAD, k = 1, c = 1), the default recommended by Wu et al., "A
   comprehensive study of non-adaptive and residual-based adaptive sampling for PINNs" (2023):
   half of the mass follows the residual, half is spread out;
3. adds them as a block ``NAME+addedK`` weighted so that the block's group keeps its weight in
   the loss (``w_b · mean`` over all of the group's points), and solves again from the checkpoint.

A round is kept only when the validation loss falls below ``(1 - MIN_GAIN)`` times the best so
far and no block's part of it rises by more than the square root of the factor by which the
total fell (at least ``1 + MIN_GAIN``; at most :data:`BLOCK_RISE_MAX` for a block holding
:data:`BLOCK_SHARE_MIN` of the total or more): a round that buys interior accuracy with the
boundary's or the initial condition's is refused. The rounds stop there, after
``pde.adaptive.rounds``, or past ``pde.adaptive.time_limit``.
The validation points never change, and the candidates are drawn from a generator of their own,
so no validation point is ever fitted.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.distributed import SINGLE, Comm, shard_range
from lsr_cli.errors import ConfigError

from .problem import Block, PdeProblem, set_scales
from .validation import validation_problem

TRIGGER = 1.0
"""Rounds run while the validation loss exceeds this many times the fit loss: whenever the
predictor is worse between the points than at them (a round is kept only when it lowers the
validation loss by ``MIN_GAIN``, so a round that gains nothing costs one solve). Measured
(docs/benchmarks/unseen_pinns.md): 10, the first value, left a Burgers PINN trained by Adam at
1.50e-1 (validation 1.28× the fit loss), where one round of added points reaches 1.32e-1; on the
Poisson sample the extra round is refused (1.52e-8 either way, 16 → 26 s)."""

MIN_GAIN = 0.1
"""A round is kept when it lowers the best validation loss by at least this fraction."""

BLOCK_SHARE_MIN = 0.01
"""A block left with less than this share of the round's validation loss is held to the square
root rule only (:data:`BLOCK_RISE_MAX` does not apply): the shipped Burgers sample's round lowers
the total 43× and raises the boundary's part 3.7×, from 2.7e-10 to 1.0e-9 (0.4 % of the total),
and its reference error falls 238× with the round against 66× without it."""

BLOCK_RISE_MAX = 2.0
"""However far the total fell, a round that raises one block's part of the validation loss by
more than this factor (the block holding at least :data:`BLOCK_SHARE_MIN` of the total after the
round) is refused. Measured: on the Burgers-shock PINN trained by Adam + L-BFGS
(``benchmarks/unseen_pinns.py``) round 2 lowered the total 10× and raised the initial
condition's part 3× (allowed by the square root alone); keeping it and round 3 took the
reference error from 1.29e-3 (round 1) to 7.94e-3, since a shock's position follows its initial
data. Harmless rises seen: 1.4× (the Poisson sample's boundary at round-off, error 8.6× lower),
1.34× (a diffusion–reaction PINN's initial condition, error lower)."""

CANDIDATE_OFFSET = 15485863
"""The candidate generator is seeded with ``seed + CANDIDATE_OFFSET + round``."""

CANDIDATE_FACTOR = 4
CANDIDATE_MAX = 16384
ADD_MAX = 8192

DEFAULT_ROUNDS = 3
DEFAULT_TIME_LIMIT = 600.0


@dataclasses.dataclass
class AdaptiveSettings:
    """``pde.adaptive``: ``auto`` (the defaults), ``none``, or ``{rounds, time_limit}``."""

    rounds: int = DEFAULT_ROUNDS
    time_limit: float = DEFAULT_TIME_LIMIT


def adaptive_settings(raw: dict[str, Any]) -> AdaptiveSettings | None:
    """The settings from the ``pde:`` section (``None``: off)."""
    spec = raw.get("adaptive", "auto")
    if spec == "auto" or spec is True:
        return AdaptiveSettings()
    if spec in ("none", False):
        return None
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in ("rounds", "time_limit")]
        rounds, limit = spec.get("rounds", DEFAULT_ROUNDS), spec.get("time_limit", DEFAULT_TIME_LIMIT)
        ok = (
            not unknown
            and isinstance(rounds, int)
            and not isinstance(rounds, bool)
            and rounds >= 1
            and isinstance(limit, int | float)
            and not isinstance(limit, bool)
            and limit > 0
        )
        if ok:
            return AdaptiveSettings(int(rounds), float(limit))
    raise ConfigError(
        f"config.pde.adaptive: expected 'auto', 'none' or {{rounds: N >= 1, time_limit: seconds > 0}}, got {spec!r}"
    )


def candidates(problem: PdeProblem, seed: int, round_index: int) -> PdeProblem | None:
    """The candidate points of every ``pde`` block (all ranks' points, unsharded)."""
    cand, _ = validation_problem(
        problem,
        seed,
        offset=CANDIDATE_OFFSET + round_index,
        max_points=CANDIDATE_MAX,
        factor=CANDIDATE_FACTOR,
        kinds=("pde",),
    )
    return cand


def _residual_by_block(model: nn.Module, cand: PdeProblem, chunk: int = 4096) -> list[Tensor]:
    out = []
    with torch.no_grad():
        for b in cand.blocks:
            parts = [
                b.residual(model, tuple(x[s : s + chunk] for x in b.inputs)).reshape(-1)
                for s in range(0, b.points.shape[0], chunk)
            ]
            out.append(torch.cat(parts).detach())
    return out


def _rad_draw(r: Tensor, n: int, gen: torch.Generator) -> Tensor | None:
    """``n`` distinct candidate indices drawn with probability ``∝ |r| / mean|r| + 1`` (RAD);
    ``None`` when the residual is zero or not finite."""
    mag = r.double().abs().cpu()
    if not bool(torch.isfinite(mag).all()) or float(mag.sum()) == 0.0:
        return None
    p = mag / mag.mean() + 1.0
    return torch.multinomial(p / p.sum(), min(n, int(mag.numel())), replacement=False, generator=gen)


def _drawn_block(parent: Block, cb: Block, idx: Tensor, comm: Comm, **fields: Any) -> Block:
    """A block of ``parent``'s kind on the candidates ``idx`` of ``cb``; this rank keeps its share."""
    s, e = shard_range(int(idx.numel()), comm.rank, comm.world)
    keep = idx[s:e].to(cb.points.device)
    base = {"name": parent.name, "weight": parent.weight, "spec": parent.spec}
    return Block(
        **{**base, **fields},
        kind=parent.kind,
        points=cb.points[keep],
        inputs=tuple(x[keep] for x in cb.inputs),
        residual_fn=cb.residual_fn,
        first_point=s,
        total_points=int(idx.numel()),
    )


def augment(
    problem: PdeProblem,
    cand: PdeProblem,
    model: nn.Module,
    round_index: int,
    gen: torch.Generator,
    comm: Comm = SINGLE,
) -> tuple[PdeProblem, dict[str, int]]:
    """``problem`` with a block of points added per ``pde`` block of ``cand`` where ``model``'s
    residual is large (RAD sampling, see the module doc); this rank keeps its share of them."""
    blocks = [copy.copy(b) for b in problem.blocks]
    added: dict[str, int] = {}
    for cb, r in zip(cand.blocks, _residual_by_block(model, cand), strict=True):
        parent = next(b for b in blocks if b.name == cb.name)
        idx = _rad_draw(r, min(ADD_MAX, parent.num_global), gen)
        if idx is None:
            continue
        group = [b for b in blocks if b.name == parent.name or b.spec.get("adaptive_of") == parent.name]
        total_weight = sum(b.weight for b in group)
        new = _drawn_block(
            parent,
            cb,
            idx,
            comm,
            name=f"{parent.name}+added{round_index + 1}",
            weight=0.0,
            spec={**parent.spec, "points": {"adaptive": parent.name}, "adaptive_of": parent.name},
        )
        group.append(new)
        count = sum(b.num_global for b in group)
        for b in group:
            b.weight = total_weight * b.num_global / count
        blocks.append(new)
        added[parent.name] = new.num_global
    out = dataclasses.replace(problem, blocks=blocks)
    set_scales(out.blocks)
    return out, added


def redraw(
    problem: PdeProblem, cand: PdeProblem, model: nn.Module, gen: torch.Generator, comm: Comm = SINGLE
) -> tuple[PdeProblem, dict[str, int]]:
    """``problem`` with the points of each ``pde`` block of ``cand`` drawn again, as many, where
    ``model``'s residual is large (RAD from the candidates, see the module doc); names and
    weights stay. Blocks without candidates (boundary, initial, data) keep their points."""
    blocks = list(problem.blocks)
    drawn: dict[str, int] = {}
    for cb, r in zip(cand.blocks, _residual_by_block(model, cand), strict=True):
        i = next((j for j, b in enumerate(blocks) if b.name == cb.name), None)
        idx = None if i is None else _rad_draw(r, blocks[i].num_global, gen)
        if i is None or idx is None:
            continue
        blocks[i] = _drawn_block(blocks[i], cb, idx, comm)
        drawn[cb.name] = blocks[i].num_global
    out = dataclasses.replace(problem, blocks=blocks)
    set_scales(out.blocks)
    return out, drawn


__all__ = [
    "ADD_MAX",
    "AdaptiveSettings",
    "BLOCK_RISE_MAX",
    "BLOCK_SHARE_MIN",
    "MIN_GAIN",
    "TRIGGER",
    "adaptive_settings",
    "augment",
    "candidates",
    "redraw",
]
