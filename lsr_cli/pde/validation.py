"""Validation points that were never fitted: what one-shot PDE refinement chooses on.

Held-out rows of the fit set cannot see a predictor that is exact at the collocation points and
wrong between them (measured on a Burgers PINN with a library's default point set: residual
1e-6 at the points, reference error 4e-2). Every choice of the one-shot PDE path (rank, λ, the
exact-residual stage's kept iterate) is therefore scored on fresh points, block by block:

- a block with ``validation:`` (the same form as ``points``: ``{dataset: /validation/NAME}`` or
  ``{sample: sobol, count: N}``) uses those points;
- a block with generated points (``sample:``) draws the same number again from the validation
  generator (seeded from ``seed``, independent of the fit points);
- a boundary or initial block read from the data file whose points all lie on faces of
  ``pde.domain`` draws as many points on those faces;
- an interior block read from the data file gets points *between* its points: for each of up to
  :data:`MAX_POINTS` randomly chosen points, a random point on the segment to one of its
  :data:`NEIGHBOURS` nearest neighbours (inside the point cloud, whatever the domain's shape);
- a ``data`` block (observations), a neumann block on curved data, and a block whose value or
  coefficients come from the data file (known only at its own points) get none. (Holding 20 % of
  noisy observations out of the fit as validation rows was measured and is worse: the heat
  conductivity sample at 1 % noise, 4.2e-3 → 2.3e-2; held-out rows of every block, refitted
  after the choice, already choose the rank on observations too.)

Each validation block is weighted as its block in the loss (``√(w_b · N_val / N_val_b)``), so
the validation loss is the same weighted mean of squares as the training loss.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .fields import TIME
from .problem import Block, PdeProblem, _Builder, parse_problem, set_scales

MAX_POINTS = 4096
"""Validation points per block at most (a block with fewer fit points gets as many as it has)."""

NEIGHBOURS = 4
"""Nearest neighbours among which the partner of a point is drawn (points between the points)."""

SEED_OFFSET = 104729
"""The validation generator is seeded with ``seed + SEED_OFFSET`` (independent of the fit points)."""


def _from_data(spec: Any) -> bool:
    """Whether a value or coefficient spec is read from the data file (known only at its points)."""
    if isinstance(spec, dict):
        return True
    if isinstance(spec, list):
        return any(_from_data(s) for s in spec)
    return False


def between(
    points: Tensor, count: int, gen: torch.Generator, chunk: int = 512, values: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``count`` points on segments from randomly chosen points of ``points`` ``[N, d]`` to one of
    their :data:`NEIGHBOURS` nearest neighbours, at a random fraction in [0.25, 0.75]; with
    ``values`` ``[N]`` (known at the points only), their linear interpolation along the segments."""
    n = points.shape[0]
    anchors = torch.randperm(n, generator=gen)[:count] if count <= n else torch.randint(0, n, (count,), generator=gen)
    k = min(NEIGHBOURS, n - 1)
    if k < 1:
        return points[anchors].clone(), (values[anchors].clone() if values is not None else None)
    scale = (points.max(0).values - points.min(0).values).clamp_min(1e-300)  # anisotropic boxes: compare in units
    unit = points / scale
    partners = torch.empty(count, dtype=torch.long)
    for s in range(0, count, chunk):
        a = anchors[s : s + chunk]
        d = torch.cdist(unit[a], unit)
        d[torch.arange(a.shape[0]), a] = float("inf")
        near = d.topk(k, largest=False).indices
        pick = torch.randint(0, k, (a.shape[0],), generator=gen)
        partners[s : s + chunk] = near[torch.arange(a.shape[0]), pick]
    t = 0.25 + 0.5 * torch.rand(count, 1, generator=gen, dtype=points.dtype)
    new = points[anchors] + t * (points[partners] - points[anchors])
    if values is None:
        return new, None
    return new, values[anchors] + t[:, 0].to(values.dtype) * (values[partners] - values[anchors])


def _on_box_faces(problem: PdeProblem, blk: Block) -> bool:
    box = problem.box
    if box is None:
        return False
    tol = 1e-9 * float((box.hi - box.lo).abs().max())
    on = torch.zeros(blk.points.shape[0], dtype=torch.bool)
    for i, v in enumerate(problem.variables):
        if blk.kind == "initial" and v != TIME:
            continue
        if blk.kind != "initial" and v == TIME:
            continue
        sides = [box.lo[i]] if blk.kind == "initial" else [box.lo[i], box.hi[i]]
        for bound in sides:
            on |= (blk.points[:, i].double() - float(bound)).abs() <= tol
    return bool(on.all())


class _Injected(_Builder):
    """A builder whose ``{dataset: NAME}`` point specs may name tensors made here."""

    def __init__(
        self, raw: dict[str, Any], data_path: Path | None, gen: torch.Generator, instance: tuple[str, int] | None
    ) -> None:
        super().__init__(raw, data_path, gen, instance)
        self.injected: dict[str, Tensor] = {}

    def dataset(self, where: str, name: Any) -> Tensor:
        if isinstance(name, str) and name in self.injected:
            return self.injected[name]
        return super().dataset(where, name)


def validation_problem(
    problem: PdeProblem,
    seed: int,
    offset: int = SEED_OFFSET,
    max_points: int = MAX_POINTS,
    factor: int = 1,
    kinds: tuple[str, ...] | None = None,
) -> tuple[PdeProblem | None, dict[str, Any]]:
    """The validation problem of ``problem`` (every rank's points: shard it for a distributed
    run), or ``None`` when no block allows validation points, and what was done per block.

    The same rules draw other point sets too (:mod:`.adaptive`'s candidates): ``offset`` seeds
    the generator (``seed + offset``), a block gets ``min(max_points, factor · N_b)`` points,
    and ``kinds`` (if given) limits the blocks; the config's own ``validation:`` points are
    used only for the validation set itself (``offset`` = :data:`SEED_OFFSET`)."""
    data_path, base_dir = problem.data_path, problem.base_dir
    raw = copy.deepcopy(problem.raw)
    if raw.get("validation", "auto") in ("none", False):
        return None, {"source": "pde.validation: none"}
    gen = torch.Generator().manual_seed(int(seed) + offset)
    fit = parse_problem(problem.raw, data_path, torch.Generator().manual_seed(int(seed)), base_dir, problem.instance)
    keep: list[int] = []
    info: dict[str, Any] = {}
    injected: dict[str, Tensor] = {}
    coeffs = raw.get("coefficients") or {}
    coeff_from_data = any(_from_data(c) for c in coeffs.values())
    for i, (spec, blk) in enumerate(zip(raw["blocks"], fit.blocks, strict=True)):
        count = min(max_points, factor * blk.num_global)
        own = spec.get("validation") if offset == SEED_OFFSET else None
        if kinds is not None and blk.kind not in kinds:
            continue
        if own is not None:  # validated by parse_problem
            spec["points"] = own
            how = "config"
        elif blk.kind == "data":
            info[blk.name] = {"points": 0, "source": "none: observations exist only at their points"}
            continue
        elif blk.kind in ("dirichlet", "initial") and _from_data(spec.get("value")) and not blk.generated:
            # boundary values known at the file's points only: interpolated between neighbours
            key = f"__validation_{i}"
            pts, vals = between(blk.points.double(), count, gen, values=blk.inputs[1].double())
            assert vals is not None
            injected[key], injected[key + "_value"] = pts, vals
            spec["points"], spec["value"] = {"dataset": key}, {"dataset": key + "_value"}
            how = f"between the block's points, values interpolated ({NEIGHBOURS} nearest neighbours)"
        elif _from_data(spec.get("value")) or (blk.kind == "pde" and coeff_from_data):
            info[blk.name] = {"points": 0, "source": "none: its values come from the data file"}
            continue
        elif blk.generated:
            spec["points"] = {**spec["points"], "count": count}
            how = "sampled again"
        elif blk.kind in ("dirichlet", "neumann", "initial", "periodic") and _on_box_faces(fit, blk):
            spec["points"] = {"sample": "uniform", "count": count}
            how = "sampled on the domain's faces"
        elif blk.kind in ("pde", "dirichlet", "initial"):
            key = f"__validation_{i}"
            injected[key] = between(blk.points.double(), count, gen)[0]
            spec["points"] = {"dataset": key}
            how = f"between the block's points ({NEIGHBOURS} nearest neighbours)"
        else:
            info[blk.name] = {"points": 0, "source": "none: its points are not on the domain's faces"}
            continue
        keep.append(i)
        info[blk.name] = {"points": None, "source": how}
    if not keep:
        return None, {"blocks": info, "source": "no block allows validation points"}
    raw["blocks"] = [raw["blocks"][i] for i in keep]
    builder = _Injected(raw, data_path, gen, problem.instance)
    builder.injected = injected
    val = parse_problem(raw, data_path, gen, base_dir, problem.instance, builder=builder)
    val.reference = None
    set_scales(val.blocks)
    for blk in val.blocks:
        info[blk.name]["points"] = blk.num_global
    return val, {"blocks": info, "seed": int(seed) + offset}


__all__ = ["MAX_POINTS", "between", "validation_problem"]
