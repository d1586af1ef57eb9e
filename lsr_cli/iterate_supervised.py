"""``lsr iterate`` on supervised data (no ``pde:`` section): a plain network from the LSR predictor.

Each outer iteration:

1. one-shot LSR (:func:`~lsr_cli.refine.refine`: rank and λ chosen on the ``val`` split, or on
   held-out training rows without one) at the current weights → the refined predictor
   ``q(θ, x) + J(x) δ``;
2. its values at the training inputs are the target; the network is fitted to them by
   Levenberg–Marquardt with geodesic acceleration in parameter subspaces
   (:func:`~lsr_cli.pde.iterate.gauss_newton_fit`), re-linearized every step;
3. the iteration is kept only if the network's loss on the ``val`` split falls (the training
   split's when there is none): the mean squared error, or with ``lsr.loss: relative`` the
   weighted one that LSR fits; a rejected or non-finite iteration is undone.

The written network is the best kept one. Nothing here prints.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lsr_cli.checkpoint import LoadedCheckpoint, require_plain_network
from lsr_cli.config import Config
from lsr_cli.data import Split
from lsr_cli.metrics import describe_change, format_error
from lsr_cli.refine import _moved, predict, prepare_module, refine, sample_weights, weigh_samples
from lsr_cli.runtime import NoProgress, ProgressSink, no_tf32, peak_memory_bytes, start_run

from .pde.iterate import IterateResult, gauss_newton_fit

ROW_CHUNK = 4096


def _outputs(model: nn.Module, split: Split) -> Tensor:
    return predict(model, split.inputs, ROW_CHUNK, shared=split.shared).reshape(split.targets.shape)


def _mse(model: nn.Module, split: Split, weights: Tensor | None = None) -> float:
    """Mean squared error; with ``weights`` (``[N]``, ``lsr.loss: relative``) each sample's errors weighted."""
    return _weighted_mse(_outputs(model, split) - split.targets, weights)


def _weighted_mse(d: Tensor, weights: Tensor | None) -> float:
    return float(weigh_samples(d, weights).square().mean())


def _rel_l2(model: nn.Module, split: Split) -> float:
    out = _outputs(model, split)
    return float(torch.linalg.norm(out - split.targets) / torch.linalg.norm(split.targets).clamp_min(1e-300))


def iterate_supervised(
    ckpt: LoadedCheckpoint,
    splits: dict[str, Split],
    cfg: Config,
    progress: ProgressSink | None = None,
    start_iteration: int = 0,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
) -> IterateResult:
    """Iterate LSR and network fits on the ``train`` split of ``splits`` (see the module doc);
    ``test`` (or ``val``) errors are reported before and after, the ``val`` split chooses."""
    require_plain_network(ckpt)
    sink = progress or NoProgress()
    dtype, device, gen = start_run(cfg.dtype, cfg.device, cfg.seed)
    it_cfg = cfg.iterate
    timings = {"lsr": 0.0, "align": 0.0, "evaluate": 0.0}
    history: list[dict[str, Any]] = []
    warnings: list[str] = []
    with no_tf32():
        module = prepare_module(ckpt, dtype, device)
        data = {name: _moved(s, device, dtype) for name, s in splits.items()}
        train = data["train"]
        chooser = data.get("val", train)
        weights = sample_weights(data, cfg.lsr.loss, cfg.data.path) or {}
        w_train, w_chooser = weights.get("train"), weights.get("val" if "val" in data else "train")
        report_on = "test" if "test" in data else ("val" if "val" in data else "train")
        start_crit = _mse(module, chooser, w_chooser)
        start_train = _mse(module, train, w_train)
        start_errors = {name: {"rel_l2": _rel_l2(module, s), "mse": _mse(module, s)} for name, s in data.items()}
        best_state = copy.deepcopy(module.state_dict())
        best = (start_iteration - 1, start_train, start_crit)
        stale = 0
        stop_reason = f"reached iterate.iterations = {it_cfg.iterations}"
        advance = sink.begin("I-LSR iterations", it_cfg.iterations)
        for k in range(start_iteration, start_iteration + it_cfg.iterations):
            t0 = time.perf_counter()
            current = dataclasses.replace(ckpt, module=copy.deepcopy(module), delta=None)
            sub = refine(current, splits, cfg, NoProgress())
            target = _outputs(sub.model, train).detach()
            lin_train = _weighted_mse(target - train.targets, w_train)
            lin_ref = _rel_l2(sub.model, data[report_on])
            estimate = float(
                torch.linalg.norm(_outputs(module, train) - target) / torch.linalg.norm(target).clamp_min(1e-300)
            )
            t1 = time.perf_counter()
            timings["lsr"] += t1 - t0
            steps = gauss_newton_fit(module, train.inputs, target.reshape(-1), cfg, gen, shared=train.shared)
            t2 = time.perf_counter()
            timings["align"] += t2 - t1
            net_train = _mse(module, train, w_train)
            crit = _mse(module, chooser, w_chooser)
            fit = float(
                torch.linalg.norm(_outputs(module, train) - target) / torch.linalg.norm(target).clamp_min(1e-300)
            )
            net_ref = _rel_l2(module, data[report_on])
            kept = math.isfinite(crit) and math.isfinite(net_train) and crit < best[2]
            if kept:
                best_state = copy.deepcopy(module.state_dict())
                best, stale = (k, net_train, crit), 0
            else:
                module.load_state_dict(best_state)
                stale += 1
                if not (math.isfinite(crit) and math.isfinite(net_train)):
                    warnings.append(f"non-finite loss at iteration {k}: the step was rejected")
            timings["evaluate"] += time.perf_counter() - t2
            entry = {
                "iteration": k,
                "rank": sub.rank,
                "residual_loss": {"linearized": lin_train, "network": net_train},
                "reference_rel_l2": {"linearized": lin_ref, "network": net_ref},
                "reference_split": report_on,
                "network_error_estimate": estimate,
                "criterion": {"name": "val_loss" if "val" in data else "train_loss", "value": crit, "kept": kept},
                "alignment": {"relative_fit": fit, "gauss_newton_steps": steps},
                "seconds": {"lsr": t1 - t0, "align": t2 - t1, "total": time.perf_counter() - t0},
            }
            history.append(entry)
            if on_iteration is not None:
                on_iteration(entry)
            advance(1)
            if stale >= it_cfg.patience:
                stop_reason = f"the network's loss on the {'val' if 'val' in data else 'train'} split did not fall for {stale} iterations"
                break
        sink.end()
        module.load_state_dict(best_state)
        end_errors = {name: {"rel_l2": _rel_l2(module, s), "mse": _mse(module, s)} for name, s in data.items()}

    best_it, best_train, best_crit = best
    errors: dict[str, dict[str, dict[str, float | None]]] = {
        name: {"before": dict(start_errors[name]), "after": dict(end_errors[name])} for name in data
    }
    chooser_name = "val split" if "val" in data else "train split"
    if best_it < start_iteration:
        status, message = "unchanged", f"no iteration lowered the network's loss on the {chooser_name}; unchanged"
    else:
        status = "improved"
        b, a = start_errors[report_on]["rel_l2"], end_errors[report_on]["rel_l2"]
        message = (
            f"the network's rel L2 error on the {report_on} split {format_error(b)} -> {format_error(a)} "
            f"({describe_change(b, a)}); kept iteration {best_it}, chosen by its loss on the {chooser_name} "
            f"({best_crit:.3g} vs {start_crit:.3g} at the start)"
        )
    peak, kind = peak_memory_bytes(device)
    return IterateResult(
        status,
        message,
        module,
        best_it,
        history,
        errors,
        {},
        {"before": start_train, "after": best_train},
        timings,
        sum(p.numel() for p in module.parameters()),
        int(train.targets.numel()),
        str(device),
        cfg.dtype,
        peak,
        kind,
        stop_reason,
        warnings,
        {
            "criterion": f"network's {'relative (lsr.loss) ' if weights else ''}mean squared error on the {chooser_name}",
            "start": start_crit,
            "kept": best_crit,
        },
    )


__all__ = ["iterate_supervised"]
