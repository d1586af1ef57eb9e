"""Throughput of the sketch stage: matrix-free JVP/VJP path vs the dense (materialized) path.

For an MLP with about 10 000 parameters on 10 000 samples (the "10k × 10k" case), times the two
sketch products ``Y = J Ω`` and ``B = Jᵀ Q`` (k columns each) on both Jacobian paths of
``lsr_cli`` and reports the achieved GFLOP/s — counted as the ``2 · 2nmk`` flops of the two
equivalent dense products — as a ratio to a plain float64 matmul of the same size measured in
the same run (so the ratio, not the absolute speed, is what carries over between machines).
The dense path's time includes materializing ``J`` (per-sample reverse-mode Jacobians).

    OMP_NUM_THREADS=1 python benchmarks/throughput.py            # ~2-4 min on one core
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --ranks 128 512 --samples 10000
"""

from __future__ import annotations

import argparse
import time

import torch

from lsr_cli.linearization import JacobianOperator, ParameterSpace, materialize
from lsr_cli.models import MLP


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--hidden", type=int, nargs="+", default=[70, 70, 70])
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    net = MLP(2, 1, hidden=args.hidden).double().eval()
    x = torch.rand(args.samples, 2, dtype=torch.float64) * 2 - 1
    space = ParameterSpace({k: v.detach() for k, v in net.named_parameters()})
    op = JacobianOperator(net, space, (x,), row_chunk=512, tangent_chunk=32)
    n, m = op.shape
    print(
        f"MLP 2-{'-'.join(map(str, args.hidden))}-1: m = {m} parameters, n = {n} rows, threads = {torch.get_num_threads()}"
    )
    gen = torch.Generator().manual_seed(args.seed)

    t_mat = timed(lambda: materialize(op, 2**34, torch.Generator().manual_seed(0)))
    dense, why = materialize(op, 2**34, torch.Generator().manual_seed(0))
    assert dense is not None, why
    print(f"materialize J ({n} x {m}, {n * m * 8 / 1e6:.0f} MB): {t_mat:.2f} s")
    print(
        f"{'k':>5} {'path':<12} {'J Omega':>9} {'J^T Q':>9} {'sketch s':>9} {'GFLOP/s':>8} {'matmul GF/s':>12} {'ratio':>7}"
    )
    rows = []
    for k in args.ranks:
        omega = torch.randn(m, k, generator=gen, dtype=torch.float64)
        Q = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
        A = torch.randn(n, m, dtype=torch.float64, generator=gen)
        # the reference is the faster orientation of each product: with row-major tensors MKL runs
        # ``A @ W`` for a skinny W at about half of the speed of ``(Wᵀ Aᵀ)ᵀ`` (lsr_cli/blas.py);
        # before this was noticed the plain forms were the reference, which flattered the ratios
        t_fwd = min(timed(lambda A=A, W=omega: A @ W, repeat=2), timed(lambda A=A, W=omega: (W.T @ A.T).T, repeat=2))
        t_bwd = min(timed(lambda A=A, Q=Q: A.T @ Q, repeat=2), timed(lambda A=A, Q=Q: (Q.T @ A).T, repeat=2))
        t_gemm = t_fwd + t_bwd
        flops = 2 * 2 * n * m * k
        gemm_rate = flops / t_gemm / 1e9
        for path, o, extra in (("matrix-free", op, 0.0), ("dense", dense, t_mat)):
            t_f = timed(lambda o=o, W=omega: o.matmat(W))
            t_b = timed(lambda o=o, Q=Q: o.rmatmat(Q))
            total = t_f + t_b + extra
            rate = flops / total / 1e9
            rows.append((k, path, rate / gemm_rate))
            label = path + (" (+mat.)" if extra else "")
            print(
                f"{k:>5} {label:<12} {t_f:>8.2f}s {t_b:>8.2f}s {total:>8.2f}s {rate:>8.2f} {gemm_rate:>12.2f} "
                f"{rate / gemm_rate:>7.1%}"
            )
    for k in args.ranks:
        mf = next(r for kk, p, r in rows if kk == k and p == "matrix-free")
        de = next(r for kk, p, r in rows if kk == k and p == "dense")
        print(f"k = {k}: throughput ratio to matmul {mf:.1%} matrix-free -> {de:.1%} dense ({de / mf:.1f}x)")


if __name__ == "__main__":
    main()
