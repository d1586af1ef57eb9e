"""End-to-end tests of the ``lsr`` command line (``refine``, ``evaluate``, ``inspect``).

Every refinement uses a small fixed rank (``--rank 8`` or a ``4,8`` sweep) on the CPU, so the
whole file runs in seconds. Failures are checked for the documented exit code, a one-line
``error:`` message that names the culprit, no traceback, and no file written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import lsr_cli
from lsr_cli.cli import app
from lsr_cli.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    NumericalError,
    OutputError,
)
from lsr_cli.models import MLP

RANK = "8"
NUM_PARAMETERS = 2 * 16 + 16 + 16 * 16 + 16 + 16 * 1 + 1  # MLP 2-16-16-1 of the fixture
RTOL = 1e-6
SPLIT_NAMES = ("train", "val", "test")
METRICS = ("rel_l2", "rmse", "max_abs")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _runner() -> CliRunner:
    """A runner that keeps stdout and stderr apart (the default of Typer's own runner and of
    click >= 8.2; older click needs ``mix_stderr=False``)."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def run(*args: Any) -> Any:
    """Invoke ``lsr ARGS`` in-process; paths may be given as :class:`Path`."""
    return _runner().invoke(app, [str(a) for a in args])


def all_output(result: Any) -> str:
    return (result.stdout or "") + (result.stderr or "")


def refine_args(
    checkpoint: Path,
    files: dict[str, Path],
    out: Path,
    report: Path,
    *extra: Any,
    rank: str = RANK,
    config: Path | None | bool = True,
) -> list[Any]:
    """Arguments of a fast ``lsr refine`` (fixture data and config unless overridden)."""
    args: list[Any] = [
        "refine",
        checkpoint,
        "--data",
        files["data"],
        "--out",
        out,
        "--report",
        report,
        "--rank",
        rank,
        "--device",
        "cpu",
    ]
    if config is True:
        args += ["--config", files["config"]]
    elif config:
        args += ["--config", config]
    return args + list(extra)


def assert_ok(result: Any) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}: {all_output(result)}\n{result.exception!r}"


def refine_json(files: dict[str, Path], name: str, config_text: str, kind: str = "state_dict", rank: str = RANK) -> Any:
    """The JSON report of a fast ``lsr refine --json`` of ``files[kind]`` with the config
    ``config_text`` (written to ``NAME.yaml``; outputs ``NAME.pt`` and ``NAME.json``)."""
    cfg = files["dir"] / f"{name}.yaml"
    cfg.write_text(config_text)
    out, rep = files["dir"] / f"{name}.pt", files["dir"] / f"{name}.json"
    result = run(*refine_args(files[kind], files, out, rep, "--json", rank=rank, config=cfg))
    assert_ok(result)
    return json.loads(result.stdout)


def tmp_leftovers(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def assert_clean_failure(
    result: Any,
    code: int,
    needles: str | list[str],
    absent: list[Path] = (),
    directory: Path | None = None,
    before: set[str] | None = None,
) -> None:
    """Exit ``code``, an ``error:`` line containing every needle, no traceback, nothing written."""
    text = all_output(result)
    assert result.exit_code == code, f"expected exit {code}, got {result.exit_code}: {text}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"crashed instead of exiting: {result.exception!r}"
    assert "error:" in text, text
    assert "Traceback" not in text, text
    for needle in [needles] if isinstance(needles, str) else needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    assert result.stdout.strip() == "", f"a failure printed on stdout: {result.stdout!r}"
    for path in absent:
        assert not path.exists(), f"{path} was written by a failing run"
    if directory is not None:
        assert tmp_leftovers(directory) == []
        if before is not None:
            assert listing(directory) == before, f"files appeared: {listing(directory) - before}"


def num_train(files: dict[str, Path]) -> int:
    """Residual rows of the fixture: training samples × one output."""
    with h5py.File(files["data"], "r") as f:
        return int(np.prod(f["train/targets"].shape))


def read_split(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    with h5py.File(data, "r") as f:
        x = torch.from_numpy(f[f"{split}/inputs"][()]).to(torch.float64)
        y = torch.from_numpy(f[f"{split}/targets"][()]).to(torch.float64)
    return x, y


def rel_l2(pred: torch.Tensor, target: torch.Tensor) -> float:
    pred = pred.detach().to(torch.float64).reshape(target.shape)
    return float(torch.linalg.norm(pred - target) / torch.linalg.norm(target))


def write_h5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for name, arr in arrays.items():
            f.create_dataset(name, data=arr)
    return path


def fixture_arrays(data: Path) -> dict[str, np.ndarray]:
    """Every dataset of the fixture's HDF5 file by path (``train/inputs`` ...)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(data, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def do_refine(
    files: dict[str, Path], kind: str, *extra: Any, name: str | None = None, rank: str = RANK
) -> tuple[Path, Path, dict[str, Any]]:
    """Refine the fixture's ``kind`` checkpoint with ``--json``; returns (out, report, report JSON)."""
    name = name or kind
    out = files["dir"] / f"{name}.refined.pt"
    report = files["dir"] / f"{name}.report.json"
    result = run(*refine_args(files[kind], files, out, report, "--json", *extra, rank=rank))
    assert_ok(result)
    payload = json.loads(result.stdout)
    assert out.is_file() and report.is_file()
    assert json.loads(report.read_text(encoding="utf-8")) == payload
    return out, report, payload


# --------------------------------------------------------------------------------------------
# 1. successful refinement and its report
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, in_format, out_format",
    [
        ("torchscript", "torchscript", "refined_torchscript"),
        ("state_dict", "state_dict", "refined_state_dict"),
    ],
)
def test_refine_writes_checkpoint_and_complete_report(regression_files, kind, in_format, out_format):
    files = regression_files
    out, report, payload = do_refine(files, kind)

    for split in SPLIT_NAMES:
        for when in ("before", "after"):
            errs = payload["splits"][split][when]
            for metric in METRICS:
                assert isinstance(errs[metric], float) and np.isfinite(errs[metric]) and errs[metric] >= 0
    # rank 0 (the unchanged model) is always a candidate: the selection metric never gets worse
    val = payload["splits"]["val"]
    assert val["after"]["rel_l2"] <= val["before"]["rel_l2"] * (1 + 1e-12)
    assert payload["selection_metric"] == "val_loss"

    assert payload["rank"] in (0, 8)
    sweep = payload["rank_sweep"]
    assert isinstance(sweep, list) and sweep
    for entry in sweep:
        assert {"rank", "train_loss", "val_loss"} <= set(entry)
    assert sweep[0]["rank"] == 0
    assert {e["rank"] for e in sweep} == {0, 8}

    assert {"load", "save", "total"} <= set(payload["timings"])
    assert all(v >= 0 for v in payload["timings"].values())
    assert isinstance(payload["peak_memory_bytes"], int) and payload["peak_memory_bytes"] > 0
    assert payload["device"] == "cpu"
    assert payload["dtype"] == "float64"
    assert payload["num_parameters"] == NUM_PARAMETERS
    assert payload["num_residuals"] == num_train(files)
    assert payload["input"]["format"] == in_format
    assert payload["input"]["checkpoint"] == str(files[kind])
    assert payload["input"]["refined_again"] is False
    assert payload["output"] == {"checkpoint": str(out), "format": out_format, "report": str(report)}
    assert payload["config"]["lsr"]["rank"] == 8
    assert payload["config"]["device"] == "cpu"
    assert payload["versions"]["torch"] == torch.__version__
    assert payload["versions"]["lsr"] == lsr_cli.__version__
    assert tmp_leftovers(files["dir"]) == []


def test_refine_rank_sweep_keeps_the_best_candidate(regression_files):
    _, _, payload = do_refine(regression_files, "torchscript", rank="4,8")
    sweep = payload["rank_sweep"]
    assert {e["rank"] for e in sweep} == {0, 4, 8}
    best = min(sweep, key=lambda e: e["val_loss"])
    assert payload["rank"] == best["rank"]
    assert payload["splits"]["val"]["after"]["rel_l2"] <= payload["splits"]["val"]["before"]["rel_l2"] * (1 + 1e-12)


def test_refine_json_prints_only_json_on_stdout(regression_files):
    files = regression_files
    out, report = files["dir"] / "r.pt", files["dir"] / "r.json"
    result = run(*refine_args(files["torchscript"], files, out, report, "--json"))
    assert_ok(result)
    assert result.stdout.lstrip().startswith("{")
    payload = json.loads(result.stdout)  # nothing but the JSON document
    assert payload["command"] == "refine"
    assert result.stderr == ""  # no progress bars or warnings with --json


def test_refine_human_output_names_the_outputs(regression_files):
    files = regression_files
    out, report = files["dir"] / "human.pt", files["dir"] / "human.json"
    result = run(*refine_args(files["torchscript"], files, out, report))
    assert_ok(result)
    assert "wrote" in result.stdout and out.name in result.stdout and report.name in result.stdout
    assert out.is_file() and report.is_file()


def test_refine_default_output_paths(regression_files):
    files = regression_files
    result = run(
        "refine",
        files["torchscript"],
        "--data",
        files["data"],
        "--config",
        files["config"],
        "--rank",
        RANK,
        "--device",
        "cpu",
        "--quiet",
    )
    assert_ok(result)
    out = files["dir"] / "model_ts.refined.pt"
    assert out.is_file()
    assert (files["dir"] / "model_ts.refined.report.json").is_file()


# --------------------------------------------------------------------------------------------
# 2./3. the refined checkpoints reproduce the report outside the CLI
# --------------------------------------------------------------------------------------------

_STANDALONE = textwrap.dedent("""
    import json, sys
    import h5py, torch
    model = torch.jit.load(sys.argv[1], map_location="cpu")
    with h5py.File(sys.argv[2], "r") as f:
        x = torch.from_numpy(f["test/inputs"][()]).to(torch.float64)
        y = torch.from_numpy(f["test/targets"][()]).to(torch.float64)
    with torch.no_grad():
        pred = model(x)
    pred_grad = model(x).detach()  # grad mode on: same values
    err = lambda p: float(torch.linalg.norm(p.to(torch.float64).reshape(y.shape) - y) / torch.linalg.norm(y))
    print(json.dumps({"rel_l2": err(pred), "rel_l2_grad": err(pred_grad),
                      "lsr_cli_imported": "lsr_cli" in sys.modules, "format": model.lsr_format}))
""")


def test_refined_torchscript_runs_without_lsr(regression_files):
    files = regression_files
    out, _, payload = do_refine(files, "torchscript")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _STANDALONE, str(out), str(files["data"])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=files["dir"],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["lsr_cli_imported"] is False
    assert got["format"].startswith("lsr-refined-torchscript")
    expected = payload["splits"]["test"]["after"]["rel_l2"]
    assert got["rel_l2"] == pytest.approx(expected, rel=RTOL)
    assert got["rel_l2_grad"] == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_load_refined_reproduces_report(regression_files, kind):
    files = regression_files
    out, _, payload = do_refine(files, kind)
    model = lsr_cli.load_refined(out)
    assert isinstance(model, torch.nn.Module)
    for split in SPLIT_NAMES:
        x, y = read_split(files["data"], split)
        with torch.no_grad():
            pred = model(x)
        assert rel_l2(pred, y) == pytest.approx(payload["splits"][split]["after"]["rel_l2"], rel=RTOL)


# --------------------------------------------------------------------------------------------
# 4. evaluate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_evaluate_original_and_refined(regression_files, kind):
    files = regression_files
    out, _, payload = do_refine(files, kind)

    original = run(
        "evaluate", files[kind], "--data", files["data"], "--config", files["config"], "--device", "cpu", "--json"
    )
    assert_ok(original)
    before = json.loads(original.stdout)
    assert before["format"] == kind
    refined = run("evaluate", out, "--data", files["data"], "--device", "cpu", "--json")
    assert_ok(refined)
    after = json.loads(refined.stdout)
    assert after["format"] == f"refined_{kind}"

    for split in SPLIT_NAMES:
        assert before["splits"][split]["rel_l2"] == pytest.approx(
            payload["splits"][split]["before"]["rel_l2"], rel=RTOL
        )
        assert after["splits"][split]["rel_l2"] == pytest.approx(payload["splits"][split]["after"]["rel_l2"], rel=RTOL)
    assert after["splits"]["test"]["rel_l2"] == pytest.approx(payload["splits"]["test"]["after"]["rel_l2"], rel=RTOL)


def test_evaluate_human_output(regression_files):
    files = regression_files
    result = run("evaluate", files["torchscript"], "--data", files["data"], "--device", "cpu")
    assert_ok(result)
    for split in SPLIT_NAMES:
        assert split in result.stdout


# --------------------------------------------------------------------------------------------
# 5. inspect
# --------------------------------------------------------------------------------------------


def _num_params(path: Path) -> int:
    return sum(p.numel() for p in torch.jit.load(str(path)).parameters())


def test_inspect_torchscript(regression_files):
    files = regression_files
    result = run("inspect", files["torchscript"], "--json")
    assert_ok(result)
    info = json.loads(result.stdout)
    assert info["format"] == "torchscript"
    assert info["num_parameters"] == _num_params(files["torchscript"]) == NUM_PARAMETERS
    assert info["refined"] is False


@pytest.mark.parametrize(
    "config_text",
    [
        None,  # the fixture's config: factory mlp with hidden [16, 16]
        "model: {factory: mlp}\n",  # the built-in mlp infers every size from the state dict
    ],
)
def test_inspect_state_dict(regression_files, config_text):
    files = regression_files
    config = files["config"]
    if config_text is not None:
        config = files["dir"] / "infer.yaml"
        config.write_text(config_text, encoding="utf-8")
    result = run("inspect", files["state_dict"], "--config", config, "--json")
    assert_ok(result)
    info = json.loads(result.stdout)
    state = torch.load(files["state_dict"], weights_only=True)
    expected = sum(v.numel() for k, v in state.items() if k.startswith("net."))  # buffers excluded
    assert info["format"] == "state_dict"
    assert info["num_parameters"] == expected == NUM_PARAMETERS
    assert info["model"]["factory"] == "mlp"
    assert info["model"]["kwargs"]["hidden"] == [16, 16]


def test_inspect_state_dict_without_factory_is_a_config_error(regression_files):
    files = regression_files
    result = run("inspect", files["state_dict"], "--json")
    assert_clean_failure(result, ConfigError.exit_code, ["config.model.factory", "mlp"])


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_inspect_refined(regression_files, kind):
    files = regression_files
    out, _, payload = do_refine(files, kind)
    result = run("inspect", out, "--json")
    assert_ok(result)
    info = json.loads(result.stdout)
    assert info["format"] == f"refined_{kind}"
    assert info["refined"] is True
    # the count is that of the base network (θ0), not θ0 plus the stored δ
    assert info["num_parameters"] == _num_params(files["torchscript"]) == NUM_PARAMETERS
    assert info["metadata"]["rank"] == payload["rank"]
    assert info["metadata"]["refined_again"] is False
    if payload["rank"] > 0:
        assert info["delta_norm"] > 0


def test_inspect_human_output(regression_files):
    result = run("inspect", regression_files["torchscript"])
    assert_ok(result)
    assert "torchscript" in result.stdout and "net.0.weight" in result.stdout


# --------------------------------------------------------------------------------------------
# 6. refining a refined checkpoint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["torchscript", "state_dict"])
def test_refine_a_refined_checkpoint_again(regression_files, kind):
    files = regression_files
    first_out, _, first = do_refine(files, kind)
    second_out = files["dir"] / "again.pt"
    second_report = files["dir"] / "again.json"
    result = run(*refine_args(first_out, files, second_out, second_report, "--json"))
    assert_ok(result)
    second = json.loads(result.stdout)
    assert second["input"]["refined_again"] is True
    assert second["input"]["format"] == f"refined_{kind}"
    assert second["output"]["format"] == f"refined_{kind}"
    # the starting point of the second run is the first run's refined predictor
    for split in SPLIT_NAMES:
        assert second["splits"][split]["before"]["rel_l2"] == pytest.approx(
            first["splits"][split]["after"]["rel_l2"], rel=RTOL
        )
    assert second["splits"]["val"]["after"]["rel_l2"] <= second["splits"]["val"]["before"]["rel_l2"] * (1 + 1e-12)

    info = json.loads(run("inspect", second_out, "--json").stdout)
    assert info["metadata"]["refined_again"] is True
    evaluated = run("evaluate", second_out, "--data", files["data"], "--device", "cpu", "--json")
    assert_ok(evaluated)
    got = json.loads(evaluated.stdout)["splits"]["test"]["rel_l2"]
    assert got == pytest.approx(second["splits"]["test"]["after"]["rel_l2"], rel=RTOL)


# --------------------------------------------------------------------------------------------
# 7. bad input: exit code, helpful one-line message, nothing written
# --------------------------------------------------------------------------------------------

Setup = Callable[[dict[str, Path]], dict[str, Any]]


def _missing_checkpoint(files):
    return {"checkpoint": files["dir"] / "absent_model.pt"}


def _text_checkpoint(files):
    path = files["dir"] / "notes_model.pt"
    path.write_text("this is a text file, not a checkpoint\n", encoding="utf-8")
    return {"checkpoint": path}


def _pickled_module(files):
    path = files["dir"] / "whole_module.pt"
    torch.save(MLP(2, 1, [4]), path)
    return {"checkpoint": path}


def _nan_weight(files):
    state = torch.load(files["state_dict"], weights_only=True)
    state["net.0.bias"][0] = float("nan")
    path = files["dir"] / "nan_weights.pt"
    torch.save(state, path)
    return {"checkpoint": path}


def _missing_data(files):
    return {"data": files["dir"] / "absent_data.h5"}


def _not_hdf5(files):
    path = files["dir"] / "plain.h5"
    path.write_text("x,y\n1,2\n", encoding="utf-8")
    return {"data": path}


def _no_train_group(files):
    arrays = fixture_arrays(files["data"])
    renamed = {k.replace("train/", "training/"): v for k, v in arrays.items()}
    return {"data": write_h5(files["dir"] / "no_train.h5", renamed)}


def _no_train_inputs(files):
    arrays = fixture_arrays(files["data"])
    arrays["train/features"] = arrays.pop("train/inputs")
    return {"data": write_h5(files["dir"] / "no_inputs.h5", arrays)}


def _three_input_columns(files):
    arrays = fixture_arrays(files["data"])
    for split in SPLIT_NAMES:
        x = arrays[f"{split}/inputs"]
        arrays[f"{split}/inputs"] = np.concatenate([x, x[:, :1]], axis=1)
    return {"data": write_h5(files["dir"] / "three_cols.h5", arrays)}


def _wrong_target_size(files):
    arrays = fixture_arrays(files["data"])
    for split in SPLIT_NAMES:
        arrays[f"{split}/targets"] = np.repeat(arrays[f"{split}/targets"], 3, axis=1)
    return {"data": write_h5(files["dir"] / "three_targets.h5", arrays)}


def _nan_targets(files):
    arrays = fixture_arrays(files["data"])
    arrays["train/targets"][7, 0] = np.nan
    return {"data": write_h5(files["dir"] / "nan.h5", arrays)}


def _inf_inputs(files):
    arrays = fixture_arrays(files["data"])
    arrays["train/inputs"][3, 1] = np.inf
    return {"data": write_h5(files["dir"] / "inf.h5", arrays)}


def _train_is_a_dataset(files):
    arrays = fixture_arrays(files["data"])
    train = arrays.pop("train/inputs")
    arrays.pop("train/targets")
    return {"data": write_h5(files["dir"] / "flat.h5", {"train": train, **arrays})}


def _sample_count_mismatch(files):
    arrays = fixture_arrays(files["data"])
    arrays["train/targets"] = arrays["train/targets"][:-1]
    return {"data": write_h5(files["dir"] / "short.h5", arrays)}


def _empty_train(files):
    arrays = fixture_arrays(files["data"])
    arrays["train/inputs"] = arrays["train/inputs"][:0]
    arrays["train/targets"] = arrays["train/targets"][:0]
    return {"data": write_h5(files["dir"] / "empty.h5", arrays)}


def _bad_val_features(files):
    arrays = fixture_arrays(files["data"])
    x = arrays["val/inputs"]
    arrays["val/inputs"] = np.concatenate([x, x], axis=1)
    return {"data": write_h5(files["dir"] / "bad_val.h5", arrays)}


def _config_file(name: str, text: str, checkpoint: str = "torchscript") -> Setup:
    def setup(files):
        path = files["dir"] / name
        path.write_text(text, encoding="utf-8")
        return {"config": path, "checkpoint": files[checkpoint]}

    return setup


def _rank(value: str) -> Setup:
    return lambda files: {"rank": value}


BAD_INPUTS = [
    pytest.param(
        _missing_checkpoint, CheckpointError.exit_code, ["absent_model.pt", "not found"], id="missing-checkpoint"
    ),
    pytest.param(
        _text_checkpoint,
        CheckpointError.exit_code,
        ["notes_model.pt", "not a PyTorch checkpoint"],
        id="text-checkpoint",
    ),
    pytest.param(
        _pickled_module, CheckpointError.exit_code, ["whole_module.pt", "not plain weights", "MLP"], id="pickled-module"
    ),
    pytest.param(
        _nan_weight, NumericalError.exit_code, ["nan_weights.pt", "model output", "non-finite"], id="nan-output"
    ),
    pytest.param(_missing_data, DataError.exit_code, ["absent_data.h5", "not found"], id="missing-data"),
    pytest.param(_not_hdf5, DataError.exit_code, ["plain.h5", "not an HDF5 file"], id="not-hdf5"),
    pytest.param(_no_train_group, DataError.exit_code, ["/train", "training/", "val/", "test/"], id="no-train-group"),
    pytest.param(
        _no_train_inputs, DataError.exit_code, ["/train/inputs", "features ({n_train}, 2)"], id="no-train-inputs"
    ),
    pytest.param(
        _three_input_columns, CheckpointError.exit_code, ["does not accept the inputs", "(3,)"], id="input-features"
    ),
    pytest.param(_wrong_target_size, CheckpointError.exit_code, ["targets have shape (3,)", "(1,)"], id="target-size"),
    pytest.param(_nan_targets, DataError.exit_code, ["/train/targets", "NaN"], id="nan-targets"),
    pytest.param(_inf_inputs, DataError.exit_code, ["inf.h5:/train/inputs", "NaN or Inf"], id="inf-inputs"),
    pytest.param(
        _train_is_a_dataset, DataError.exit_code, ["flat.h5:/train", "found a dataset"], id="train-is-dataset"
    ),
    pytest.param(
        _sample_count_mismatch, DataError.exit_code, ["/train/inputs", "same leading dimension"], id="sample-count"
    ),
    pytest.param(_empty_train, DataError.exit_code, ["/train/targets", "no samples"], id="empty-train"),
    pytest.param(_bad_val_features, CheckpointError.exit_code, ["split 'val'", "(4,)"], id="val-input-features"),
    pytest.param(
        _config_file("typo.yaml", "lsr: {rnak: 5}\n"),
        ConfigError.exit_code,
        ["typo.yaml", "rnak", "did you mean 'rank'"],
        id="config-unknown-key",
    ),
    pytest.param(
        _config_file("type.yaml", 'lsr: {oversampling: "ten"}\n'),
        ConfigError.exit_code,
        ["config.lsr.oversampling", "integer", "'ten'"],
        id="config-wrong-type",
    ),
    pytest.param(
        _config_file("syntax.yaml", "lsr:\n  rank: [8\n  start_rank: }\n"),
        ConfigError.exit_code,
        ["syntax.yaml", "not valid YAML", "line 3"],
        id="config-invalid-yaml",
    ),
    pytest.param(
        _config_file("list.yaml", "- rank\n- 8\n"),
        ConfigError.exit_code,
        ["list.yaml", "mapping at the top level"],
        id="config-not-a-mapping",
    ),
    pytest.param(
        lambda files: {"config": files["dir"] / "absent.yaml"},
        ConfigError.exit_code,
        ["absent.yaml", "not found"],
        id="config-missing",
    ),
    pytest.param(_rank("0"), ConfigError.exit_code, ["--rank", "at least 1"], id="rank-zero"),
    pytest.param(_rank("4,x"), ConfigError.exit_code, ["--rank", "'4,x'"], id="rank-not-a-number"),
    pytest.param(_rank("100000"), ConfigError.exit_code, ["100000", "between 1 and {limit}"], id="rank-too-large"),
    pytest.param(
        _config_file("factory.yaml", 'model: {factory: "nonexistent_mod:build"}\n', "state_dict"),
        ConfigError.exit_code,
        ["config.model.factory", "nonexistent_mod"],
        id="unknown-factory",
    ),
    pytest.param(
        _config_file("shapes.yaml", "model: {factory: mlp, kwargs: {hidden: [8, 8]}}\n", "state_dict"),
        CheckpointError.exit_code,
        ["model_sd.pt", "does not fit", "net.0.weight"],
        id="state-dict-shapes",
    ),
]


@pytest.mark.parametrize("setup, code, needles", BAD_INPUTS)
def test_refine_bad_input_fails_cleanly(regression_files, setup, code, needles):
    files = regression_files
    opts = {"checkpoint": files["torchscript"], "data": files["data"], "config": files["config"], "rank": RANK}
    opts.update(setup(files))
    out, report = files["dir"] / "refined.pt", files["dir"] / "report.json"
    n_train = num_train(files)
    needles = [n.format(n_train=n_train, limit=min(n_train, NUM_PARAMETERS)) for n in needles]
    before = listing(files["dir"])
    result = run(
        "refine",
        opts["checkpoint"],
        "--data",
        opts["data"],
        "--config",
        opts["config"],
        "--out",
        out,
        "--report",
        report,
        "--rank",
        opts["rank"],
        "--device",
        "cpu",
    )
    assert_clean_failure(result, code, needles, [out, report], files["dir"], before)


@pytest.mark.parametrize("command", ["evaluate", "inspect"])
@pytest.mark.parametrize(
    "setup, code, needles",
    [
        BAD_INPUTS[0],
        BAD_INPUTS[1],
        BAD_INPUTS[2],
    ],
)
def test_evaluate_and_inspect_bad_checkpoint_fail_cleanly(regression_files, command, setup, code, needles):
    files = regression_files
    checkpoint = setup(files)["checkpoint"]
    before = listing(files["dir"])
    extra = ["--data", files["data"]] if command == "evaluate" else []
    result = run(command, checkpoint, *extra, "--json")
    assert_clean_failure(result, code, needles, [], files["dir"], before)


def test_evaluate_bad_data_fails_cleanly(regression_files):
    files = regression_files
    data = _nan_targets(files)["data"]
    result = run("evaluate", files["torchscript"], "--data", data, "--device", "cpu", "--json")
    assert_clean_failure(result, DataError.exit_code, ["nan.h5", "/train/targets"])


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--dtype", "float16", "'float16'"),
        ("--device", "tpu", "'tpu'"),
        ("--seed", "-1", "--seed"),
    ],
)
def test_refine_bad_option_value(regression_files, option, value, needle):
    files = regression_files
    out, report = files["dir"] / "refined.pt", files["dir"] / "report.json"
    before = listing(files["dir"])
    result = run(*refine_args(files["torchscript"], files, out, report, option, value))
    assert_clean_failure(result, ConfigError.exit_code, [needle], [out, report], files["dir"], before)


def test_refine_without_data_is_a_config_error(regression_files):
    files = regression_files
    out = files["dir"] / "refined.pt"
    before = listing(files["dir"])
    result = run("refine", files["torchscript"], "--out", out, "--rank", RANK, "--device", "cpu")
    assert_clean_failure(result, ConfigError.exit_code, ["--data", "data.path"], [out], files["dir"], before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["refine", "evaluate"])
def test_cuda_unavailable(regression_files, command):
    files = regression_files
    out, report = files["dir"] / "refined.pt", files["dir"] / "report.json"
    before = listing(files["dir"])
    if command == "refine":
        args = refine_args(files["torchscript"], files, out, report)
        args[args.index("--device") + 1] = "cuda"
    else:
        args = ["evaluate", files["torchscript"], "--data", files["data"], "--device", "cuda"]
    result = run(*args)
    assert_clean_failure(
        result, DeviceError.exit_code, ["'cuda'", "CUDA is not available"], [out, report], files["dir"], before
    )


@pytest.mark.parametrize("existing", ["out", "report"])
def test_existing_output_needs_force(regression_files, existing):
    files = regression_files
    paths = {"out": files["dir"] / "refined.pt", "report": files["dir"] / "report.json"}
    taken = paths[existing]
    taken.write_bytes(b"precious bytes")
    other = paths["report" if existing == "out" else "out"]
    before = listing(files["dir"])

    result = run(*refine_args(files["torchscript"], files, paths["out"], paths["report"]))
    assert_clean_failure(result, OutputError.exit_code, [taken.name, "--force"], [other], files["dir"], before)
    assert taken.read_bytes() == b"precious bytes"

    result = run(*refine_args(files["torchscript"], files, paths["out"], paths["report"], "--force", "--json"))
    assert_ok(result)
    payload = json.loads(paths["report"].read_text(encoding="utf-8"))
    assert payload["output"]["checkpoint"] == str(paths["out"])
    assert paths["out"].read_bytes() != b"precious bytes"
    assert torch.jit.load(str(paths["out"])).lsr_format.startswith("lsr-refined-torchscript")
    assert tmp_leftovers(files["dir"]) == []


def test_failed_run_with_force_keeps_existing_outputs(regression_files):
    files = regression_files
    out, report = files["dir"] / "refined.pt", files["dir"] / "report.json"
    out.write_bytes(b"old checkpoint")
    report.write_bytes(b"old report")
    before = listing(files["dir"])
    result = run(*refine_args(files["torchscript"], files, out, report, "--force", rank="100000"))
    assert_clean_failure(result, ConfigError.exit_code, ["100000"], [], files["dir"], before)
    assert out.read_bytes() == b"old checkpoint"
    assert report.read_bytes() == b"old report"


def test_output_that_is_a_directory_is_refused(regression_files):
    files = regression_files
    out = files["dir"] / "a_directory"
    out.mkdir()
    report = files["dir"] / "report.json"
    before = listing(files["dir"])
    for extra in ([], ["--force"]):
        needle = "is a directory"
        result = run(*refine_args(files["torchscript"], files, out, report, *extra))
        assert_clean_failure(result, OutputError.exit_code, ["a_directory", needle], [report], files["dir"], before)
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize(
    "target, flag",
    [
        ("torchscript", "--out"),
        ("torchscript", "--report"),
        ("data", "--out"),
        ("config", "--report"),
    ],
)
def test_output_onto_an_input_is_refused(regression_files, target, flag):
    files = regression_files
    victim = files[target]
    original = victim.read_bytes()
    out = victim if flag == "--out" else files["dir"] / "refined.pt"
    report = victim if flag == "--report" else files["dir"] / "report.json"
    before = listing(files["dir"])
    for extra in ([], ["--force"]):  # --force never allows overwriting an input
        result = run(*refine_args(files["torchscript"], files, out, report, *extra))
        assert_clean_failure(
            result,
            OutputError.exit_code,
            [victim.name, "overwrite the input"],
            [p for p in (out, report) if p != victim],
            files["dir"],
            before,
        )
        assert victim.read_bytes() == original


def test_report_onto_the_refined_checkpoint_is_refused(regression_files):
    files = regression_files
    out = files["dir"] / "same.pt"
    before = listing(files["dir"])
    result = run(*refine_args(files["torchscript"], files, out, out))
    assert_clean_failure(result, OutputError.exit_code, ["same.pt"], [out], files["dir"], before)


def test_version():
    result = run("--version")
    assert_ok(result)
    assert lsr_cli.__version__ in result.stdout


# --------------------------------------------------------------------------------------------
# known bugs
# --------------------------------------------------------------------------------------------


def test_error_message_keeps_square_brackets_in_paths(regression_files):
    files = regression_files
    out, report = files["dir"] / "refined.pt", files["dir"] / "report.json"
    result = run(*refine_args(files["dir"] / "model[best].pt", files, out, report))
    assert_clean_failure(
        result, CheckpointError.exit_code, ["model[best].pt", "not found"], [out, report], files["dir"]
    )


def test_unwritable_output_path_is_an_output_error(regression_files):
    files = regression_files
    blocker = files["dir"] / "plain_file.txt"
    blocker.write_text("not a directory", encoding="utf-8")
    out, report = blocker / "refined.pt", files["dir"] / "report.json"
    before = listing(files["dir"])
    result = run(*refine_args(files["torchscript"], files, out, report))
    assert_clean_failure(result, OutputError.exit_code, ["plain_file.txt"], [report], files["dir"], before)


def test_report_failure_with_force_keeps_existing_checkpoint(regression_files):
    files = regression_files
    blocker = files["dir"] / "plain_file.txt"
    blocker.write_text("not a directory", encoding="utf-8")
    out, report = files["dir"] / "keep.pt", blocker / "report.json"
    out.write_bytes(b"the user's previous checkpoint")
    result = run(*refine_args(files["torchscript"], files, out, report, "--force"))
    assert result.exit_code != 0
    assert out.is_file(), "the existing checkpoint was deleted"
    assert out.read_bytes() == b"the user's previous checkpoint"
