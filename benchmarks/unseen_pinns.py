"""PINNs `lsr` has never seen, trained the way users of other libraries train them (issue 15, item 6).

Five physics-informed networks, each built here in plain torch (own residual code, independent of
``lsr_cli``'s equations), trained DeepXDE-style — small tanh MLPs (3–4 hidden layers × 20–50,
Glorot-normal weights, zero biases, raw inputs), random uniform collocation points in the
libraries' default counts, equal loss weights, full-batch Adam (lr 1e-3, float32), for two of them
followed by L-BFGS — and each with a reference solution:

| problem | PDE | reference |
|---|---|---|
| ``burgers`` | u_t + u u_x − (0.01/π) u_xx = 0, u(x,0) = −sin πx, u(±1,t) = 0 | Cole–Hopf, Gauss–Hermite quadrature |
| ``allen_cahn`` | u_t − 0.001 u_xx − 5(u − u³) = 0, u(x,0) = x² cos πx, u(±1,t) = −1 | method of lines, 2049 points, RK4 |
| ``helmholtz`` | Δu + u = f on [−1,1]², u = sin(πx) sin(4πy) | exact |
| ``diffusion_reaction`` | u_t − u_xx − u² = f on [−π,π]×[0,1] (DeepXDE's example plus a u² term) | exact |
| ``poisson_lshape`` | −Δu = 0 on the L-shape [−1,1]² ∖ (0,1]×[−1,0), u = r^{2/3} sin(2θ/3) on ∂Ω | exact (corner singularity) |

For each: the Adam (or Adam + L-BFGS) start; ``lsr refine`` and ``lsr iterate`` (CLI subprocesses,
``--json``) with a config naming only the file's points; continued L-BFGS (float64, strong Wolfe,
the same loss) for the wall time ``lsr refine`` took; and the oracle dense Gauss–Newton one-shot:
the residual Jacobian G of every row of the file (float64, ``torch.func``), its SVD, and for every
truncation rank r the linearized predictor q(θ0) + J δ_r at the reference points — the best
reference error over r is the attainable one-shot at those points.

    OMP_NUM_THREADS=1 python benchmarks/unseen_pinns.py [--problems burgers poisson_lshape] [--skip-iterate]
    OMP_NUM_THREADS=1 python benchmarks/unseen_pinns.py --only-iterate   # the `lsr iterate` column alone

``lsr iterate`` runs with its defaults (``iterate.time_limit`` bounds it; ``--iterations N`` overrides
the iteration cap); the second table records the written network's error and gain, the best LSR
predictor an iteration produced, the wall and CPU time of the command and the iterations kept.

Trained networks, data files, configs and reports are cached under ``--work``
(default ``runs/unseen_pinns/``); results go to ``docs/benchmarks/unseen_pinns.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import yaml
from torch import Tensor
from torch.func import functional_call, hessian, jacrev, vmap

ROOT = Path(__file__).resolve().parent.parent
F32, F64 = torch.float32, torch.float64
NU = 0.01 / math.pi

# pde residual at one point: (x [d], u [], grad [d], hess [d, d]) -> []
PointResidual = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# problems


@dataclass
class Block:
    """One residual block: ``kind`` is ``pde`` (the PDE residual) or ``value`` (u − values)."""

    name: str
    kind: str
    points: np.ndarray  # [N_b, d]
    values: np.ndarray | None = None  # [N_b] for kind value
    weight: float = 1.0
    lsr: dict[str, Any] = field(default_factory=dict)  # the block's entry in the lsr config


@dataclass
class Problem:
    name: str
    title: str
    variables: list[str]
    domain: dict[str, list[float]]
    hidden: list[int]
    adam_iterations: int
    lbfgs_iterations: int  # 0: Adam only
    residual: PointResidual
    blocks: list[Block]
    ref_inputs: np.ndarray  # [N, d]
    ref_values: np.ndarray  # [N]
    pde_config: dict[str, Any]  # equation, constants, coefficients


def _uniform(rng: np.random.Generator, n: int, lo: list[float], hi: list[float]) -> np.ndarray:
    return rng.uniform(lo, hi, size=(n, len(lo)))


def _space_time_blocks(
    rng: np.random.Generator,
    xr: tuple[float, float],
    n: tuple[int, int, int],
    u0: Callable,
    g: Callable,
    u0s: str,
    gs: str,
) -> list[Block]:
    """interior / initial / boundary blocks on [xr] × [0, 1] (DeepXDE: uniform random points)."""
    interior = _uniform(rng, n[0], [xr[0], 0.0], [xr[1], 1.0])
    x0 = rng.uniform(*xr, n[1])
    initial = np.stack([x0, np.zeros_like(x0)], 1)
    tb = rng.uniform(0, 1, n[2])
    side = np.where(rng.uniform(size=n[2]) < 0.5, xr[0], xr[1])
    boundary = np.stack([side, tb], 1)
    return [
        Block("interior", "pde", interior, lsr={"kind": "pde"}),
        Block("initial", "value", initial, u0(initial), lsr={"kind": "initial", "value": u0s}),
        Block("boundary", "value", boundary, g(boundary), lsr={"kind": "dirichlet", "value": gs}),
    ]


def _cole_hopf(x: np.ndarray, t: np.ndarray, nodes: int = 200) -> np.ndarray:
    """Burgers (ν = 0.01/π, u0 = −sin πx) by the Cole–Hopf formula, Gauss–Hermite in η = √(4νt)s."""
    s, w = np.polynomial.hermite.hermgauss(nodes)
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], 4096):
        xs, ts = x[i : i + 4096], t[i : i + 4096]
        y = xs[:, None] - np.sqrt(4 * NU * ts)[:, None] * s
        a = np.log(w) - np.cos(np.pi * y) / (2 * np.pi * NU)
        e = np.exp(a - a.max(axis=1, keepdims=True))
        out[i : i + 4096] = -np.sum(np.sin(np.pi * y) * e, 1) / np.sum(e, 1)
    return out


def burgers() -> Problem:
    rng = np.random.default_rng(1)
    blocks = _space_time_blocks(
        rng,
        (-1.0, 1.0),
        (4096, 256, 256),
        lambda p: -np.sin(np.pi * p[:, 0]),
        lambda p: np.zeros(p.shape[0]),
        "-sin(pi*x)",
        "0",
    )
    x, t = np.meshgrid(np.linspace(-1, 1, 256), np.linspace(0, 1, 101), indexing="xy")
    ref = np.stack([x.ravel(), t.ravel()], 1)
    return Problem(
        "burgers",
        "Burgers shock (ν = 0.01/π)",
        ["x", "t"],
        {"x": [-1, 1], "t": [0, 1]},
        [20, 20, 20],
        15000,  # DeepXDE's Burgers example: 15 000 Adam iterations (its L-BFGS stage left out)
        0,
        lambda p, u, g, h: g[..., 1] + u * g[..., 0] - NU * h[..., 0, 0],
        blocks,
        ref,
        _cole_hopf(ref[:, 0], ref[:, 1]),
        {"equation": "burgers", "constants": {"viscosity": NU}, "coefficients": {"nu": "viscosity"}},
    )


def _allen_cahn_reference(nx: int = 2049, dt: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """u_t = 0.001 u_xx + 5(u − u³), u(±1) = −1, by second-order differences and RK4; every 8th x, t = 0:0.01:1."""
    x = np.linspace(-1, 1, nx)
    dx = x[1] - x[0]
    u = x**2 * np.cos(np.pi * x)

    def rhs(v: np.ndarray) -> np.ndarray:
        out = np.zeros_like(v)
        out[1:-1] = 1e-3 * (v[2:] - 2 * v[1:-1] + v[:-2]) / dx**2 + 5 * (v[1:-1] - v[1:-1] ** 3)
        return out

    snaps = [u.copy()]
    steps_per = round(0.01 / dt)
    for _ in range(100):
        for _ in range(steps_per):
            k1 = rhs(u)
            k2 = rhs(u + dt / 2 * k1)
            k3 = rhs(u + dt / 2 * k2)
            k4 = rhs(u + dt * k3)
            u = u + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        snaps.append(u.copy())
    xs = x[::8]
    tt, xx = np.meshgrid(np.linspace(0, 1, 101), xs, indexing="ij")
    vals = np.stack(snaps)[:, ::8]
    return np.stack([xx.ravel(), tt.ravel()], 1), vals.ravel()


def allen_cahn() -> Problem:
    rng = np.random.default_rng(2)
    blocks = _space_time_blocks(
        rng,
        (-1.0, 1.0),
        (4000, 400, 200),
        lambda p: p[:, 0] ** 2 * np.cos(np.pi * p[:, 0]),
        lambda p: -np.ones(p.shape[0]),
        "x**2*cos(pi*x)",
        "-1",
    )
    ref, vals = _allen_cahn_reference()
    return Problem(
        "allen_cahn",
        "Allen–Cahn (ε = 0.001, γ = 5)",
        ["x", "t"],
        {"x": [-1, 1], "t": [0, 1]},
        [20, 20, 20],
        3000,
        300,
        lambda p, u, g, h: g[..., 1] - 1e-3 * h[..., 0, 0] - 5 * (u - u**3),
        blocks,
        ref,
        vals,
        {"equation": "allen_cahn", "coefficients": {"epsilon": 1e-3, "gamma": 5.0}},
    )


HELM_F = 1 - 17 * math.pi**2  # f = (k² − (1 + 16)π²) sin(πx) sin(4πy), k = 1


def helmholtz() -> Problem:
    rng = np.random.default_rng(3)
    interior = _uniform(rng, 2500, [-1, -1], [1, 1])
    s = rng.uniform(-1, 1, 400)
    face = rng.integers(0, 4, 400)
    bd = np.stack(
        [np.where(face < 2, np.where(face == 0, -1.0, 1.0), s), np.where(face < 2, s, np.where(face == 2, -1.0, 1.0))],
        1,
    )
    x, y = np.meshgrid(np.linspace(-1, 1, 81), np.linspace(-1, 1, 81))
    ref = np.stack([x.ravel(), y.ravel()], 1)
    return Problem(
        "helmholtz",
        "Helmholtz, u = sin(πx) sin(4πy)",
        ["x", "y"],
        {"x": [-1, 1], "y": [-1, 1]},
        [40, 40, 40],
        2000,
        0,
        lambda p, u, g, h: (
            h[..., 0, 0]
            + h[..., 1, 1]
            + u
            - HELM_F * torch.sin(math.pi * p[..., 0]) * torch.sin(4 * math.pi * p[..., 1])
        ),
        [
            Block("interior", "pde", interior, lsr={"kind": "pde"}),
            Block("boundary", "value", bd, np.zeros(400), lsr={"kind": "dirichlet", "value": "0"}),
        ],
        ref,
        np.sin(np.pi * ref[:, 0]) * np.sin(4 * np.pi * ref[:, 1]),
        {"equation": "helmholtz", "coefficients": {"k": 1.0, "source": f"{HELM_F!r}*sin(pi*x)*sin(4*pi*y)"}},
    )


DR_MODES = (1, 2, 3, 4, 8)


def _dr_exact(x: Any, t: Any, lib: Any) -> Any:
    return lib.exp(-t) * sum(lib.sin(k * x) / k for k in DR_MODES)


def _dr_source(x: Any, t: Any, lib: Any) -> Any:
    # u_t − u_xx − u² = f for u = e^{-t} Σ sin(kx)/k: u_t − u_xx = e^{-t} Σ (k − 1/k) sin(kx)
    return lib.exp(-t) * sum((k - 1 / k) * lib.sin(k * x) for k in DR_MODES) - _dr_exact(x, t, lib) ** 2


def diffusion_reaction() -> Problem:
    rng = np.random.default_rng(4)
    blocks = _space_time_blocks(
        rng,
        (-math.pi, math.pi),
        (320, 160, 80),  # DeepXDE's diffusion_reaction example: num_domain, num_initial, num_boundary
        lambda p: _dr_exact(p[:, 0], p[:, 1], np),
        lambda p: np.zeros(p.shape[0]),
        "sin(x) + sin(2*x)/2 + sin(3*x)/3 + sin(4*x)/4 + sin(8*x)/8",
        "0",
    )
    u = "(exp(-t)*(sin(x) + sin(2*x)/2 + sin(3*x)/3 + sin(4*x)/4 + sin(8*x)/8))"
    f = "exp(-t)*(" + " + ".join(f"{k - 1 / k!r}*sin({k}*x)" for k in DR_MODES) + f") - {u}**2"
    x, t = np.meshgrid(np.linspace(-math.pi, math.pi, 201), np.linspace(0, 1, 101))
    ref = np.stack([x.ravel(), t.ravel()], 1)
    return Problem(
        "diffusion_reaction",
        "diffusion–reaction (DeepXDE example + u²)",
        ["x", "t"],
        {"x": [-math.pi, math.pi], "t": [0, 1]},
        [30, 30, 30],
        8000,
        0,
        lambda p, u, g, h: g[..., 1] - h[..., 0, 0] - u**2 - _dr_source(p[..., 0], p[..., 1], torch),
        blocks,
        ref,
        _dr_exact(ref[:, 0], ref[:, 1], np),
        {"equation": "diffusion_reaction", "coefficients": {"D": 1.0, "k": 1.0, "source": f}},
    )


def _corner(p: np.ndarray) -> np.ndarray:
    """r^{2/3} sin(2θ/3), θ ∈ [0, 3π/2] on the L-shape (the cut is x > 0, y < 0)."""
    theta = np.mod(np.arctan2(p[:, 1], p[:, 0]), 2 * np.pi)
    return np.hypot(p[:, 0], p[:, 1]) ** (2 / 3) * np.sin(2 * theta / 3)


def _in_l(p: np.ndarray) -> np.ndarray:
    return ~((p[:, 0] > 0) & (p[:, 1] < 0))


def poisson_lshape() -> Problem:
    rng = np.random.default_rng(5)
    pts = _uniform(rng, 2000, [-1, -1], [1, 1])
    interior = pts[_in_l(pts)][:1200]  # DeepXDE's L-shape example: num_domain=1200, num_boundary=120
    # the six edges, total length 8, uniform in arc length
    edges = [
        ((-1, -1), (1, 0)),
        ((1, 0), (0, 1)),
        ((1, 1), (-1, 0)),
        ((-1, 1), (0, -1)),
        ((0, -1), (0, 1)),
        ((0, 0), (1, 0)),
    ]
    lengths = np.array([1, 1, 2, 2, 1, 1], dtype=float)
    s = rng.uniform(0, lengths.sum(), 120)
    bd = []
    for v in s:
        i = int(np.searchsorted(np.cumsum(lengths), v, side="right"))
        (x0, y0), (dx, dy) = edges[i]
        a = v - (np.cumsum(lengths)[i] - lengths[i])
        # edges given as start + a·direction (unit direction, a ∈ [0, length])
        bd.append((x0 + a * dx, y0 + a * dy))
    bd = np.array(bd)
    x, y = np.meshgrid(np.linspace(-1, 1, 61), np.linspace(-1, 1, 61))
    ref = np.stack([x.ravel(), y.ravel()], 1)
    ref = ref[_in_l(ref)]
    return Problem(
        "poisson_lshape",
        "Poisson, L-shape corner r^{2/3} sin(2θ/3)",
        ["x", "y"],
        {"x": [-1, 1], "y": [-1, 1]},
        [50, 50, 50, 50],
        3000,
        300,
        lambda p, u, g, h: -(h[..., 0, 0] + h[..., 1, 1]),
        [
            Block("interior", "pde", interior, lsr={"kind": "pde"}),
            Block(
                "boundary",
                "value",
                bd,
                _corner(bd),
                lsr={"kind": "dirichlet", "value": {"dataset": "/values/boundary"}},
            ),
        ],
        ref,
        _corner(ref),
        {"equation": "poisson", "coefficients": {"source": 0.0}},
    )


def burgers_lbfgs() -> Problem:
    """The same Burgers PINN trained with DeepXDE's full recipe: Adam, then L-BFGS."""
    return dataclasses.replace(burgers(), name="burgers_lbfgs", lbfgs_iterations=5000)


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "burgers": burgers,
    "burgers_lbfgs": burgers_lbfgs,
    "allen_cahn": allen_cahn,
    "helmholtz": helmholtz,
    "diffusion_reaction": diffusion_reaction,
    "poisson_lshape": poisson_lshape,
}

# --------------------------------------------------------------------------------------------
# network, residuals, training


def make_mlp(d: int, hidden: list[int], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip([d, *hidden], hidden, strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(hidden[-1], 1))
    net = torch.nn.Sequential(*layers)
    for m in net:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_normal_(m.weight)  # DeepXDE's "Glorot normal"
            torch.nn.init.zeros_(m.bias)
    return net


def block_residuals(net: torch.nn.Module, prob: Problem, data: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
    """Unscaled residual of every block, each [N_b], by batched ``torch.autograd.grad`` (training)."""
    out = []
    for b, (pts, vals) in zip(prob.blocks, data, strict=True):
        if b.kind == "pde":
            x = pts.clone().requires_grad_(True)
            u = net(x)[:, 0]
            (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
            h = torch.stack([torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0] for i in range(x.shape[1])], 1)
            out.append(prob.residual(x, u, g, h))
        else:
            assert vals is not None
            out.append(net(pts)[:, 0] - vals)
    return out


def scales(prob: Problem) -> list[float]:
    """√(w_b · N / N_b) per block, as lsr scales rows, so that ‖s r‖²/N = Σ_b w_b mean_b(r_b²)."""
    n = sum(len(b.points) for b in prob.blocks)
    return [math.sqrt(b.weight * n / len(b.points)) for b in prob.blocks]


def loss_of(net: torch.nn.Module, prob: Problem, data: list) -> Tensor:
    return sum(b.weight * r.square().mean() for b, r in zip(prob.blocks, block_residuals(net, prob, data), strict=True))  # type: ignore[return-value]


def tensors(prob: Problem, dtype: torch.dtype) -> list[tuple[Tensor, Tensor | None]]:
    return [
        (torch.tensor(b.points, dtype=dtype), None if b.values is None else torch.tensor(b.values, dtype=dtype))
        for b in prob.blocks
    ]


def ref_error(net: torch.nn.Module, prob: Problem) -> float:
    p = next(net.parameters())
    with torch.no_grad():
        u = net(torch.tensor(prob.ref_inputs, dtype=p.dtype))[:, 0].double().numpy()
    return float(np.linalg.norm(u - prob.ref_values) / np.linalg.norm(prob.ref_values))


def train(prob: Problem) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Full-batch Adam (lr 1e-3, float32), then L-BFGS when ``lbfgs_iterations`` (DeepXDE's recipe)."""
    net = make_mlp(len(prob.variables), prob.hidden, seed=0)
    data = tensors(prob, F32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for it in range(prob.adam_iterations):
        opt.zero_grad()
        loss = loss_of(net, prob, data)
        loss.backward()
        opt.step()
        if (it + 1) % 2000 == 0:
            log(
                f"  adam {it + 1}: loss {loss.item():.3e}  ref error {ref_error(net, prob):.3e}  ({time.perf_counter() - t0:.0f} s)"
            )
    info = {
        "adam_iterations": prob.adam_iterations,
        "adam_seconds": time.perf_counter() - t0,
        "adam_error": ref_error(net, prob),
    }
    if prob.lbfgs_iterations:
        t1 = time.perf_counter()
        lb = torch.optim.LBFGS(
            net.parameters(),
            lr=1.0,
            max_iter=prob.lbfgs_iterations,
            history_size=50,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=0.0,
        )

        def closure() -> Tensor:
            lb.zero_grad()
            loss = loss_of(net, prob, data)
            loss.backward()
            return loss

        lb.step(closure)
        info["lbfgs_iterations"] = prob.lbfgs_iterations
        info["lbfgs_seconds"] = time.perf_counter() - t1
        log(f"  + L-BFGS {prob.lbfgs_iterations}: ref error {ref_error(net, prob):.3e}")
    info["loss"] = loss_of(net, prob, data).item()
    info["error"] = ref_error(net, prob)
    return net, info


# --------------------------------------------------------------------------------------------
# files for lsr


def write_files(prob: Problem, net: torch.nn.Module, folder: Path) -> tuple[Path, Path]:
    ts, h5, cfg = folder / "model.pt", folder / "data.h5", folder / "lsr.yaml"
    torch.jit.save(torch.jit.script(net), str(ts))
    with h5py.File(h5, "w") as f:
        for b in prob.blocks:
            f[f"/collocation/{b.name}"] = b.points
            if isinstance(b.lsr.get("value"), dict):
                f[f"/values/{b.name}"] = b.values
        f["/reference/inputs"] = prob.ref_inputs
        f["/reference/values"] = prob.ref_values[:, None]
    blocks = []
    for b in prob.blocks:
        entry = {"name": b.name, **b.lsr, "points": {"dataset": f"/collocation/{b.name}"}}
        if b.weight != 1.0:
            entry["weight"] = b.weight
        blocks.append(entry)
    config = {
        "model": {"checkpoint": ts.name},
        "data": {"path": h5.name},
        "pde": {"variables": prob.variables, "domain": prob.domain, **prob.pde_config, "blocks": blocks},
    }
    cfg.write_text(f"# {prob.title}: written by benchmarks/unseen_pinns.py\n" + yaml.safe_dump(config, sort_keys=False))
    return ts, cfg


def run_lsr(command: str, ts: Path, cfg: Path, out: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    """``python -m lsr_cli COMMAND`` with ``--json``; the report plus the wall time, or the failure."""
    cmd = [
        sys.executable,
        "-m",
        "lsr_cli",
        command,
        str(ts),
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--force",
        "--json",
        *extra,
    ]
    t0, c0 = time.perf_counter(), _children_cpu()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s", "wall_seconds": time.perf_counter() - t0}
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if p.returncode != 0:
        return {"failed": f"exit {p.returncode}: {p.stderr.strip()[-2000:]}", "wall_seconds": wall, "cpu_seconds": cpu}
    report = json.loads(p.stdout)
    return {"report": report, "wall_seconds": wall, "cpu_seconds": cpu}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (wall times on a shared machine
    are inflated by the load; CPU time is not)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------------
# baselines: continued L-BFGS, oracle dense Gauss–Newton


def continued_lbfgs(prob: Problem, ts: Path, budget: float) -> dict[str, Any]:
    """L-BFGS (float64, strong Wolfe, history 50) from the start for ``budget`` seconds."""
    net = make_mlp(len(prob.variables), prob.hidden, seed=0).double()
    net.load_state_dict({k: v.double() for k, v in torch.jit.load(str(ts)).state_dict().items()})
    data = tensors(prob, F64)
    opt = torch.optim.LBFGS(
        net.parameters(),
        lr=1.0,
        max_iter=20,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_of(net, prob, data)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    steps = 0
    while time.perf_counter() - t0 < budget:
        opt.step(closure)
        steps += 20
    return {"error": ref_error(net, prob), "seconds": time.perf_counter() - t0, "iterations": steps}


def oracle_gauss_newton(prob: Problem, ts: Path, chunk: int = 128) -> dict[str, Any]:
    """Best reference error of q(θ0) + J δ_r over every truncation rank r of the dense GN step.

    G [n, m] is the scaled residual Jacobian of every row of the file, r0 [n] the scaled residual;
    G = U S Vᵀ, δ_r = −Σ_{i≤r} v_i (u_iᵀ r0)/s_i. With B = J_ref V [N_ref, K] and c_i = −u_iᵀr0/s_i,
    ‖e0 + B c_≤r‖² = ‖e0‖² + Σ_{i≤r} (2 c_i (Bᵀe0)_i + c_i² M_ii + 2 c_i Σ_{j<i} M_ij c_j), M = BᵀB.
    """
    t0 = time.perf_counter()
    net = make_mlp(len(prob.variables), prob.hidden, seed=0).double()
    net.load_state_dict({k: v.double() for k, v in torch.jit.load(str(ts)).state_dict().items()})
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def unflat(theta: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            n = math.prod(s)
            out[k] = theta[i : i + n].reshape(s)
            i += n
        return out

    def u_point(theta: Tensor, x: Tensor) -> Tensor:
        return functional_call(net, unflat(theta), (x[None],))[0, 0]

    def pde_point(theta: Tensor, x: Tensor) -> Tensor:
        return prob.residual(
            x, u_point(theta, x), jacrev(u_point, argnums=1)(theta, x), hessian(u_point, argnums=1)(theta, x)
        )

    def val_point(theta: Tensor, x: Tensor, v: Tensor) -> Tensor:
        return u_point(theta, x) - v

    rows, r0 = [], []
    for b, s, (pts, vals) in zip(prob.blocks, scales(prob), tensors(prob, F64), strict=True):
        for i in range(0, len(pts), chunk):
            x = pts[i : i + chunk]
            if b.kind == "pde":
                rows.append(s * vmap(jacrev(pde_point), in_dims=(None, 0))(theta0, x))
                with torch.no_grad():
                    r0.append(s * vmap(pde_point, in_dims=(None, 0))(theta0, x))
            else:
                assert vals is not None
                v = vals[i : i + chunk]
                rows.append(s * vmap(jacrev(val_point), in_dims=(None, 0, 0))(theta0, x, v))
                r0.append(s * vmap(val_point, in_dims=(None, 0, 0))(theta0, x, v).detach())
    G, f0 = torch.cat(rows).detach(), torch.cat(r0).detach()
    xr = torch.tensor(prob.ref_inputs, dtype=F64)
    J = torch.cat(
        [vmap(jacrev(u_point), in_dims=(None, 0))(theta0, xr[i : i + 1024]) for i in range(0, len(xr), 1024)]
    ).detach()
    t_jac = time.perf_counter() - t0
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    keep = int((S > torch.finfo(F64).eps * max(G.shape) * S[0]).sum())
    U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    c = -(U.T @ f0) / S
    with torch.no_grad():
        u0 = net(xr)[:, 0]
    uref = torch.tensor(prob.ref_values, dtype=F64)
    e0 = u0 - uref
    B = J @ Vh.T
    M = B.T @ B
    inc = 2 * c * (B.T @ e0) + c.square() * M.diagonal() + 2 * c * (torch.tril(M, -1) @ c)
    err2 = (e0.square().sum() + torch.cumsum(inc, 0)).clamp_min(0)
    err = torch.cat([e0.norm()[None], err2.sqrt()]) / uref.norm()
    best = int(torch.argmin(err))
    return {
        "error": float(err[best]),
        "rank": best,
        "full_rank_error": float(err[-1]),
        "numerical_rank": keep,
        "rows": G.shape[0],
        "parameters": G.shape[1],
        "jacobian_seconds": t_jac,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# driver


def run_problem(
    name: str,
    work: Path,
    skip_iterate: bool,
    only_iterate: bool,
    iterations: int | None,
    iterate_timeout: float,
    keep_baselines: bool = False,
) -> dict[str, Any]:
    prob = PROBLEMS[name]()
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    ts, info_path = folder / "model.pt", folder / "train.json"
    n_params = sum(a * b + b for a, b in zip([len(prob.variables), *prob.hidden], [*prob.hidden, 1], strict=True))
    if ts.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        log(f"[{name}] cached network: error {info['error']:.3e}")
        net = torch.jit.load(str(ts))
    else:
        log(f"[{name}] training {prob.title}, {n_params} parameters")
        net, info = train(prob)
        info_path.write_text(json.dumps(info, indent=1))
        log(
            f"[{name}] trained: error {info['error']:.3e} in {info['adam_seconds'] + info.get('lbfgs_seconds', 0):.0f} s"
        )
    ts, cfg = write_files(prob, net, folder)
    res: dict[str, Any] = {
        "problem": name,
        "title": prob.title,
        "network": f"{len(prob.variables)}-{'-'.join(map(str, prob.hidden))}-1 tanh ({n_params})",
        "points": {b.name: len(b.points) for b in prob.blocks},
        "training": info,
        "start_error": info["error"],
    }
    old = work / name / "result.json"
    prev = json.loads(old.read_text()) if old.exists() else {}

    if only_iterate and all(k in prev for k in ("refine", "lbfgs", "oracle")):
        res.update({k: prev[k] for k in ("refine", "lbfgs", "oracle")})
        log(f"[{name}] refine, L-BFGS and oracle results reused from {old}")
    else:
        log(f"[{name}] lsr refine")
        r = run_lsr("refine", ts, cfg, folder / "refined.pt", [], 1800)
        if "report" in r:
            rep = r["report"]
            ref = rep["splits"]["reference"]
            res["refine"] = {
                "before": ref["before"]["rel_l2"],
                "error": ref["after"]["rel_l2"],
                "rank": rep["rank"],
                "seconds": rep["timings"]["total"],
                "wall_seconds": r["wall_seconds"],
                "status": rep["status"],
                "basis": rep.get("jacobian", {}).get("basis"),
                "selection_metric": rep.get("selection_metric"),
                "warnings": rep.get("warnings", []),
                "guard": (rep.get("validation") or {}).get("guard", {}).get("outcome"),
                "adaptive": {
                    k: v
                    for k, v in ((rep.get("validation") or {}).get("adaptive") or {}).items()
                    if k in ("kept_round", "points_added", "stop_reason", "seconds")
                },
            }
            log(
                f"[{name}] lsr refine: {ref['before']['rel_l2']:.3e} -> {ref['after']['rel_l2']:.3e} rank {rep['rank']} in {rep['timings']['total']:.1f} s"
            )
        else:
            res["refine"] = {"failed": r["failed"], "wall_seconds": r["wall_seconds"]}
            log(f"[{name}] lsr refine FAILED: {r['failed']}")
        budget = res["refine"].get("seconds", res["refine"]["wall_seconds"])

    if keep_baselines and all(k in prev for k in ("lbfgs", "oracle")):
        res.update({k: prev[k] for k in ("lbfgs", "oracle")})
        log(f"[{name}] L-BFGS and oracle results reused from {old}")
    elif "lbfgs" not in res:
        log(f"[{name}] continued L-BFGS for {budget:.1f} s")
        res["lbfgs"] = continued_lbfgs(prob, ts, budget)
        log(f"[{name}] L-BFGS: {res['lbfgs']['error']:.3e} ({res['lbfgs']['iterations']} iterations)")

        log(f"[{name}] oracle dense Gauss–Newton")
        res["oracle"] = oracle_gauss_newton(prob, ts)
        o = res["oracle"]
        log(
            f"[{name}] oracle GN: {o['error']:.3e} at rank {o['rank']} of {o['numerical_rank']} (full rank {o['full_rank_error']:.3e}), G {o['rows']}x{o['parameters']}, {o['seconds']:.0f} s"
        )

    if skip_iterate:
        res["iterate"] = prev.get("iterate", {"skipped": True})
    else:
        res["iterate"] = run_iterate(name, ts, cfg, folder, iterations, iterate_timeout)
    old.write_text(json.dumps(res, indent=1))
    return res


def run_iterate(name: str, ts: Path, cfg: Path, folder: Path, iterations: int | None, timeout: float) -> dict[str, Any]:
    """``lsr iterate`` with the CLI defaults (``--iterations`` only when given); its report's
    per-iteration errors, the wall and CPU time."""
    extra = [] if iterations is None else ["--iterations", str(iterations)]
    log(f"[{name}] lsr iterate {' '.join(extra)}")
    r = run_lsr("iterate", ts, cfg, folder / "iterated.pt", extra, timeout)
    if "report" not in r:
        log(f"[{name}] lsr iterate FAILED: {r['failed']}")
        return {"failed": r["failed"], "wall_seconds": r["wall_seconds"], "cpu_seconds": r.get("cpu_seconds")}
    rep = r["report"]
    ref = rep["splits"]["reference"]
    its = rep.get("iterations", [])
    out = {
        "iterations": len(its),
        "before": ref["before"]["rel_l2"],
        "error": ref["after"]["rel_l2"],
        "predictor_error": min(
            (e for e in (it["reference_rel_l2"]["linearized"] for it in its) if e is not None), default=None
        ),
        "seconds": rep["timings"]["total"],
        "wall_seconds": r["wall_seconds"],
        "cpu_seconds": r["cpu_seconds"],
        "stop_reason": rep.get("stop_reason"),
        "best_iteration": rep.get("best_iteration"),
        "linearized_errors": [it["reference_rel_l2"]["linearized"] for it in its],
        "network_errors": [it["reference_rel_l2"]["network"] for it in its],
        "kept": [it["criterion"]["kept"] for it in its],
        "iteration_seconds": [it["seconds"] for it in its],
    }
    log(
        f"[{name}] lsr iterate: {out['before']:.3e} -> {out['error']:.3e} in {out['seconds']:.0f} s "
        f"({out['cpu_seconds']:.0f} s CPU, {len(its)} iterations)"
    )
    return out


def _e(x: Any) -> str:
    return f"{x:.2e}" if isinstance(x, (int, float)) else "—"


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| problem | network | points | start | lsr refine | gain | time | rank "
        "| L-BFGS, equal time | oracle GN | oracle rank |\n" + "|---" * 11 + "|\n"
    )
    lines = []
    for r in results:
        rf, lb, o = r["refine"], r["lbfgs"], r["oracle"]
        start = r["start_error"]
        tr = "Adam + L-BFGS" if r["training"].get("lbfgs_iterations") else "Adam"
        pts = " + ".join(str(v) for v in r["points"].values())
        if "failed" in rf:
            rcells = ["failed", "—", f"{rf['wall_seconds']:.0f} s", "—"]
        else:
            added = sum((rf.get("adaptive") or {}).get("points_added", {}).values())
            rank = str(rf["rank"]) + (f" (+{added} points)" if added else "")
            rcells = [_e(rf["error"]), f"{start / rf['error']:.3g}×", f"{rf['seconds']:.0f} s", rank]
        cells = [r["problem"], r["network"], pts, f"{_e(start)} ({tr})", *rcells]
        cells += [_e(lb["error"]), _e(o["error"]), f"{o['rank']} / {o['numerical_rank']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def iterate_table(results: list[dict[str, Any]]) -> str:
    """The acceptance table of ``lsr iterate`` with its defaults: the written plain network's
    reference error and gain, the best LSR predictor it saw, wall and CPU time, iterations."""
    head = (
        "| problem | start | lsr refine (predictor) | lsr iterate: best predictor | lsr iterate: written network "
        "| gain | wall | CPU | iterations (kept) | stopped |\n" + "|---" * 10 + "|\n"
    )
    lines = []
    for r in results:
        it, rf, start = r.get("iterate", {}), r["refine"], r["start_error"]
        refine = _e(rf.get("error"))
        if "error" in it:
            kept = sum(1 for k in it.get("kept", []) if k)
            cells = [
                _e(it.get("predictor_error")),
                _e(it["error"]),
                f"{start / it['error']:.3g}×",
                f"{it['wall_seconds']:.0f} s",
                f"{it['cpu_seconds']:.0f} s" if it.get("cpu_seconds") is not None else "—",
                f"{it['iterations']} ({kept})",
                str(it.get("stop_reason", "—")).split(":")[0],
            ]
        elif "failed" in it:
            cells = ["—", it["failed"].split(":")[0], "—", f"{it['wall_seconds']:.0f} s", "—", "—", "—"]
        else:
            cells = ["—", "not run", "—", "—", "—", "—", "—"]
        lines.append("| " + " | ".join([r["problem"], _e(start), refine, *cells]) + " |")
    return head + "\n".join(lines) + "\n"


NOTES = "<!-- notes: kept when the tables are rewritten -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "unseen_pinns")
    ap.add_argument("--skip-iterate", action="store_true")
    ap.add_argument("--only-iterate", action="store_true", help="reuse cached refine / L-BFGS / oracle results")
    ap.add_argument(
        "--keep-baselines", action="store_true", help="re-run lsr refine; reuse cached L-BFGS / oracle results"
    )
    ap.add_argument("--report-only", action="store_true", help="only rewrite the tables from cached results")
    ap.add_argument("--iterations", type=int, default=None, help="lsr iterate --iterations (default: lsr's)")
    ap.add_argument("--iterate-timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "unseen_pinns")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in [] if args.report_only else args.problems:
        run_problem(
            name,
            args.work,
            args.skip_iterate,
            args.only_iterate,
            args.iterations,
            args.iterate_timeout,
            args.keep_baselines,
        )
    # the tables list every problem with a result in the work folder, in registry order
    results = [
        json.loads((args.work / n / "result.json").read_text())
        for n in PROBLEMS
        if (args.work / n / "result.json").exists()
    ]
    md = (
        "# PINNs lsr has never seen (`benchmarks/unseen_pinns.py`)\n\n"
        "Reference relative L2 errors; times on one CPU core (`OMP_NUM_THREADS=1`) of a machine shared with "
        "other jobs (wall times are inflated by the load; CPU times are not). `lsr refine` / `lsr iterate`: CLI "
        "defaults with a config naming only the file's points; L-BFGS: float64, strong Wolfe, from the start for "
        "`lsr refine`'s time; oracle GN: dense Gauss–Newton step on the same rows at the rank with the best "
        "reference error.\n\n" + table(results) + "\n## `lsr iterate` with its defaults\n\n"
        "The written plain network against the start (gain), beside the best LSR predictor an iteration "
        "produced and `lsr refine`'s predictor (which adds collocation points). Physics passes (`iterate.physics`) fit the "
        "network's own residual at the file's points and fresh ones. "
        "`iterate.time_limit` (9 min) bounds the run; CPU: user + system seconds of the command.\n\n"
        + iterate_table(results)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md_path = args.out.with_suffix(".md")
    if md_path.exists() and NOTES in (old := md_path.read_text()):  # the hand-written notes stay
        md += "\n" + old[old.index(NOTES) :]
    md_path.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    log(md)


if __name__ == "__main__":
    main()
