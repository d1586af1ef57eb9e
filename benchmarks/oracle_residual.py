"""Can a residual-based rule find the oracle Gauss–Newton step? (issue 15, the Burgers PINNs).

``benchmarks/unseen_pinns.py`` scores `lsr refine` against the *oracle* one-shot: the dense
Gauss–Newton step ``δ_r`` at the file's points whose truncation rank ``r`` has the lowest error
against the reference solution. A run has no reference; every choice `lsr` makes is scored by the
predictor's exact residual (at fresh validation points). This script measures, for every rank of
the same dense step (the same SVD, ``δ_r = −Σ_{i≤r} v_i (u_iᵀ f0) / s_i``):

* the reference error of the refined predictor ``q(θ0, x) + J(x) δ_r``;
* its exact weighted residual loss (the equation's nonlinear terms included) at the file's
  points and at fresh points drawn as the file's were (another seed) — what a residual-based
  rule can see;
* the reference error of the network at ``θ0 + δ_r`` (a plain Gauss–Newton step on the weights).

Run (cached networks of ``unseen_pinns.py`` in ``runs/unseen_pinns``; about a minute each)::

    OMP_NUM_THREADS=1 python benchmarks/oracle_residual.py --problems burgers burgers_lbfgs

Writes ``docs/benchmarks/oracle_residual.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, hessian, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_pinns as U  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
FRESH_SEED = 12345


def _fresh_blocks(prob: U.Problem) -> list[U.Block]:
    """Points drawn as the file's were, from another seed (the Burgers problems' generator)."""
    rng = np.random.default_rng(FRESH_SEED)
    sizes = tuple(len(b.points) for b in prob.blocks)
    return U._space_time_blocks(
        rng, (-1.0, 1.0), sizes, lambda p: -np.sin(np.pi * p[:, 0]), lambda p: np.zeros(p.shape[0]), "", ""
    )


def measure(name: str, work: Path, every: int) -> dict[str, Any]:
    prob = U.PROBLEMS[name]()
    if not name.startswith("burgers"):
        raise SystemExit(f"{name}: fresh points are drawn for the Burgers problems only")
    net = U.make_mlp(len(prob.variables), prob.hidden, seed=0).double()
    net.load_state_dict({k: v.double() for k, v in torch.jit.load(str(work / name / "model.pt")).state_dict().items()})
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    d = len(prob.variables)

    def unflat(th: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            out[k] = th[i : i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return out

    def u_point(th: Tensor, x: Tensor) -> Tensor:
        return functional_call(net, unflat(th), (x[None],))[0, 0]

    def feats(th: Tensor, x: Tensor) -> Tensor:  # u, ∇u, ∇²u of one point
        g = jacrev(u_point, argnums=1)(th, x)
        h = hessian(u_point, argnums=1)(th, x)
        return torch.cat([u_point(th, x)[None], g, h.reshape(-1)])

    def residual(x: Tensor, f: Tensor) -> Tensor:
        return prob.residual(x, f[:, 0], f[:, 1 : 1 + d], f[:, 1 + d :].reshape(-1, d, d))

    def tables(blocks: list[U.Block]) -> list[tuple[str, Tensor, Tensor | None, float, Tensor, Tensor]]:
        out = []
        for b, s in zip(blocks, U.scales(prob), strict=True):
            x = torch.tensor(b.points, dtype=F64)
            v = None if b.values is None else torch.tensor(b.values, dtype=F64)
            F = torch.cat(
                [vmap(feats, in_dims=(None, 0))(theta0, x[i : i + 256]).detach() for i in range(0, len(x), 256)]
            )
            JF = torch.cat(
                [vmap(jacrev(feats), in_dims=(None, 0))(theta0, x[i : i + 256]).detach() for i in range(0, len(x), 256)]
            )
            out.append((b.kind, x, v, s, F, JF))
        return out

    def exact_loss(T: list, dth: Tensor) -> float:
        """The predictor's exact weighted residual loss ``Σ ‖s_b r_b‖² / N`` (as lsr scales rows)."""
        total, rows = 0.0, 0
        for kind, x, v, s, F, JF in T:
            f = F + JF @ dth  # the predictor's u, ∇u, ∇²u: affine in δ
            r = residual(x, f) if kind == "pde" else f[:, 0] - v
            total += float((s * r).square().sum())
            rows += len(x)
        return total / rows

    fit, fresh = tables(prob.blocks), tables(_fresh_blocks(prob))
    rows, f0 = [], []
    for kind, x, v, s, F, JF in fit:  # G and f0 of the file's points (chain rule through u, ∇u, ∇²u)
        if kind == "pde":
            Fq = F.clone().requires_grad_(True)
            r = residual(x, Fq)
            (dr,) = torch.autograd.grad(r.sum(), Fq)
            rows.append(s * torch.einsum("nf,nfm->nm", dr, JF))
            f0.append(s * r.detach())
        else:
            rows.append(s * JF[:, 0])
            f0.append(s * (F[:, 0] - v))
    G, f = torch.cat(rows), torch.cat(f0)
    Us, S, Vh = torch.linalg.svd(G, full_matrices=False)
    keep = int((S > torch.finfo(F64).eps * max(G.shape) * S[0]).sum())
    c = -(Us[:, :keep].T @ f) / S[:keep]
    xr, uref = torch.tensor(prob.ref_inputs, dtype=F64), torch.tensor(prob.ref_values, dtype=F64)
    J = torch.cat([vmap(jacrev(u_point), in_dims=(None, 0))(theta0, xr[i : i + 2048]) for i in range(0, len(xr), 2048)])
    with torch.no_grad():
        u0 = net(xr)[:, 0]
    table = []
    for r in sorted(set(range(0, keep, every)) | {keep}):
        dth = Vh[:r].T @ c[:r]
        with torch.no_grad():
            un = functional_call(net, unflat(theta0 + dth), (xr,))[:, 0]
        table.append(
            {
                "rank": r,
                "reference_predictor": float((u0 + J.detach() @ dth - uref).norm() / uref.norm()),
                "residual_fit": exact_loss(fit, dth),
                "residual_fresh": exact_loss(fresh, dth),
                "reference_network": float((un - uref).norm() / uref.norm()),
            }
        )
    oracle = min(table, key=lambda e: e["reference_predictor"])
    by_fresh = min(table, key=lambda e: e["residual_fresh"])
    return {
        "problem": name,
        "numerical_rank": keep,
        "start": table[0],
        "oracle": oracle,
        "best_fresh": by_fresh,
        "table": table,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["burgers", "burgers_lbfgs"])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "unseen_pinns")
    ap.add_argument("--every", type=int, default=8, help="score every this many ranks")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "oracle_residual")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [measure(n, args.work, args.every) for n in args.problems]
    lines = [
        "# The oracle Gauss–Newton step and the exact residual (`benchmarks/oracle_residual.py`)\n",
        "Dense Gauss–Newton step at the file's points, truncated at rank r. Reference: rel L2 error of the "
        "refined predictor q(θ0) + J δ_r; residual: its exact weighted residual loss at the file's points and "
        "at fresh points drawn as the file's were (what a rule without the reference can see). Rows: the start "
        "(r = 0), the oracle rank (lowest reference error) and the rank with the lowest fresh-point residual.\n",
        "| problem | row | rank | reference (predictor) | residual, file points | residual, fresh points | "
        "reference (network at θ0 + δ) |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for label in ("start", "oracle", "best_fresh"):
            e = res[label]
            lines.append(
                f"| {res['problem']} | {label.replace('_', ' ')} | {e['rank']} | {e['reference_predictor']:.3e} | "
                f"{e['residual_fit']:.3e} | {e['residual_fresh']:.3e} | {e['reference_network']:.3e} |"
            )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
