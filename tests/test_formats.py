"""Checkpoint formats (issue 17): torch.export in and out, library state dicts with non-weight
entries (allow-list, opt-in), safetensors, Lightning-shaped and nested checkpoints.

Library files are exact structural mimics (a fake factory package written to ``tmp_path``),
so no heavy library is needed. Refinements use a small fixed rank on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from lsr_cli.checkpoint import allowed_globals, load_checkpoint
from lsr_cli.cli import app
from lsr_cli.config import ModelConfig, parse_config
from lsr_cli.errors import CheckpointError, ConfigError
from lsr_cli.models import MLP

RANK = "8"
MATCH_ATOL = 1e-12  # .pt2 vs TorchScript refined predictor, float64 (acceptance criterion)
SAME_ATOL = 1e-12  # the same weights loaded from another format, float64


def run(*args: Any) -> Any:
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args])


def output(result: Any) -> str:
    return (result.stdout or "") + (result.stderr or "")


@pytest.fixture
def files(regression_files: dict[str, Path]) -> dict[str, Path]:
    """The regression fixture with a config that selects on the training loss, so that a rank-8
    refinement always changes the predictor (δ ≠ 0: the comparisons below are not trivial)."""
    regression_files["config"].write_text(
        "model:\n  factory: mlp\n  kwargs: {hidden: [16, 16]}\ndata: {val: null}\n"
        "lsr: {holdout: 0, tikhonov: 0}\ndevice: cpu\n"
    )
    return regression_files


def refine(checkpoint: Path, files: dict[str, Path], out: Path, *extra: Any) -> Any:
    return run(
        "refine", checkpoint, "--data", files["data"], "--config", files["config"], "--rank", RANK,
        "--out", out, "--quiet", *extra,
    )  # fmt: skip


def report_of(out: Path) -> dict[str, Any]:
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def plain_python(script: str) -> str:
    """Run ``script`` in a fresh interpreter that must never import lsr_cli; returns stdout."""
    code = textwrap.dedent(script) + "\nimport sys\nassert 'lsr_cli' not in sys.modules\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# --------------------------------------------------------------------------------------------
# torch.export out and in
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refined_pt2_runs_without_lsr_at_other_batch_sizes_and_matches_torchscript(files):
    pt2 = files["dir"] / "refined.pt2"
    ts = files["dir"] / "refined_ts.pt"
    result = refine(files["torchscript"], files, pt2, "--format", "export")
    assert result.exit_code == 0, output(result)
    assert refine(files["torchscript"], files, ts).exit_code == 0
    assert report_of(pt2)["rank"] == 8
    out = report_of(pt2)["output"]
    assert out["format"] == "refined_export" and out["dynamic_batch"] == [True]
    assert report_of(ts)["output"]["format"] == "refined_torchscript"
    stdout = plain_python(
        f"""
        import warnings
        import torch
        warnings.simplefilter("ignore")
        program = torch.export.load({str(pt2)!r}).module()
        script = torch.jit.load({str(ts)!r})
        network = torch.jit.load({str(files["torchscript"])!r})
        torch.manual_seed(1)
        for batch in (1, 2, 11, 64):  # exported with 3 rows
            x = torch.rand(batch, 2, dtype=torch.float64) * 2 - 1
            y = program(x)
            assert y.shape == (batch, 1), y.shape
            change = float((y - network(x.float()).double()).abs().max())  # the refinement did something
            print(batch, float((y - script(x)).abs().max()), change)
        """
    )
    rows = [line.split() for line in stdout.split("\n") if line]
    diffs = {int(b): float(d) for b, d, _ in rows}
    assert set(diffs) == {1, 2, 11, 64}
    assert max(diffs.values()) <= MATCH_ATOL, diffs
    assert min(float(c) for _, _, c in rows) > 1e3 * MATCH_ATOL


class _Conv(torch.nn.Module):
    """A 1×1 convolution: torch's double backward of Conv2d expands to concrete sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).sum(dim=(2, 3))


@pytest.mark.parametrize(
    "model, shape, dynamic",
    [(MLP(2, 1, hidden=[6]), (2,), True), (_Conv(), (1, 4, 4), False)],
    ids=["mlp", "conv"],
)
def test_exported_program_equals_the_jvp_predictor_and_says_whether_the_batch_is_dynamic(model, shape, dynamic):
    from lsr_cli.export import export_refined
    from lsr_cli.linearized import LinearizedModel

    torch.manual_seed(0)
    base = model.double().eval()
    delta = {n: torch.randn_like(p) for n, p in base.named_parameters()}
    data = torch.rand(20, *shape, dtype=torch.float64)
    exported = export_refined(base, delta, (data,))
    assert exported.dynamic == [dynamic]
    program = exported.program.module()
    reference = LinearizedModel(base, delta)  # torch.func.jvp
    traced = exported.example_shapes[0][0]
    for batch in (traced, 13) if dynamic else (traced,):
        x = torch.rand(batch, *shape, dtype=torch.float64)
        torch.testing.assert_close(program(x), reference(x), atol=MATCH_ATOL, rtol=0)
    if not dynamic:
        with pytest.raises(Exception, match="Guard failed"):
            program(torch.rand(traced + 1, *shape, dtype=torch.float64))


def _export_mlp(path: Path, files: dict[str, Path]) -> MLP:
    model = MLP(2, 1, hidden=[16, 16])
    model.load_state_dict(torch.load(files["state_dict"], weights_only=True))
    model = model.double().eval()
    program = torch.export.export(
        model, (torch.rand(5, 2, dtype=torch.float64),), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    torch.export.save(program, str(path))
    return model


@pytest.mark.slow
def test_pt2_input_is_recognised_by_content_and_refined_to_pt2(files):
    source = files["dir"] / "program.bin"  # the name says nothing; the content does
    model = _export_mlp(source, files)
    ckpt = load_checkpoint(source)
    assert ckpt.format == "export"
    x = torch.rand(7, 2, dtype=torch.float64)
    torch.testing.assert_close(ckpt.module(x), model(x), atol=SAME_ATOL, rtol=0)

    result = run("refine", source, "--data", files["data"], "--config", files["config"], "--rank", RANK, "-q")
    assert result.exit_code == 0, output(result)
    out = files["dir"] / "program.refined.pt2"  # the default follows the input's format
    report = report_of(out)
    assert report["input"]["format"] == "export"
    assert report["output"]["format"] == "refined_export"
    refined = load_checkpoint(out)
    assert refined.format == "refined_export"
    # refining made the training fit better: the refined predictor is not the network
    assert not torch.allclose(refined.module(x), model(x))

    again = run("refine", out, "--data", files["data"], "--config", files["config"], "--rank", RANK, "-q")
    assert again.exit_code == CheckpointError.exit_code
    assert "cannot be refined again" in output(again) and "Traceback" not in output(again)


def test_pt2_with_a_pickled_object_is_refused_and_nothing_runs(files, tmp_path):
    clean = tmp_path / "clean.pt2"
    _export_mlp(clean, files)
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import io

    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                data = json.dumps(config).encode()
                dst.writestr(item.filename.rsplit("/", 1)[0] + "/" + first["path_name"] + ".evil", b"")
            elif item.filename.endswith("weights/weight_0"):
                data = buffer.getvalue()
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match=r"evil\.pt2: refused: .*pickled.*--trust-checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_output_format_is_validated_before_any_work(files):
    out = files["dir"] / "sd_from_ts.pt"
    result = refine(files["torchscript"], files, out, "--format", "state-dict")
    assert result.exit_code == CheckpointError.exit_code
    assert "needs a state-dict checkpoint" in output(result) and "torchscript" in output(result)
    assert not out.exists()
    bad = refine(files["torchscript"], files, out, "--format", "onnx")
    assert bad.exit_code == ConfigError.exit_code
    assert "output.format (--format): expected one of torchscript, export, state-dict, safetensors, got 'onnx'" in (
        output(bad)
    )
    with pytest.raises(ConfigError, match="config.output.format: expected one of"):
        parse_config({"output": {"format": "pickle"}})


@pytest.mark.slow
def test_state_dict_input_written_as_torchscript_and_export_agree(files):
    ts = files["dir"] / "r_ts.pt"
    pt2 = files["dir"] / "r_export.pt2"
    assert refine(files["state_dict"], files, ts, "--format", "torchscript").exit_code == 0
    result = refine(files["state_dict"], files, pt2, "--format", "export")
    assert result.exit_code == 0, output(result)
    a, b = load_checkpoint(ts), load_checkpoint(pt2)
    assert (a.format, b.format) == ("refined_torchscript", "refined_export")
    from lsr_cli.linearized import load_refined

    x = torch.rand(9, 2, dtype=torch.float64)
    torch.testing.assert_close(b.module(x), load_refined(ts)(x), atol=MATCH_ATOL, rtol=0)


@pytest.mark.slow
def test_refine_on_torchscript_prints_no_deprecation_warning(files):
    out = files["dir"] / "quiet.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-W", "always", "-m", "lsr_cli", "refine", str(files["torchscript"]),
         "--data", str(files["data"]), "--config", str(files["config"]), "--rank", RANK, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.exists()
    text = done.stdout + done.stderr
    assert "deprecated" not in text.lower(), text[-2000:]
    assert "Warning" not in text, text[-2000:]


# --------------------------------------------------------------------------------------------
# library state dicts: allow-list, opt-in
# --------------------------------------------------------------------------------------------

FAKE_LAYERS = '''
import torch


class SpectralConv(torch.nn.Module):
    """Stands for a layer class that a library's constructor kwargs name."""
'''

FAKE_MODELS = '''
import torch
from torch import nn
from torch.nn import functional as F

from .layers import SpectralConv


class FNO(nn.Module):
    """Stores its constructor kwargs the way neuraloperator does (``_metadata`` in the state dict)."""

    def __init__(self, in_channels=2, out_channels=1, hidden_channels=8, non_linearity=F.gelu,
                 conv_module=SpectralConv):
        super().__init__()
        self._init_kwargs = dict(in_channels=in_channels, out_channels=out_channels,
                                 hidden_channels=hidden_channels, non_linearity=non_linearity,
                                 conv_module=conv_module)
        self.lift = nn.Linear(in_channels, hidden_channels)
        self.proj = nn.Linear(hidden_channels, out_channels)
        self.non_linearity = non_linearity

    def forward(self, x):
        return self.proj(self.non_linearity(self.lift(x)))

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        state["_metadata"] = self._init_kwargs
        return state

    def load_state_dict(self, state, strict=True, assign=False):
        state = {k: v for k, v in state.items() if k != "_metadata"}
        return super().load_state_dict(state, strict=strict, assign=assign)
'''


@pytest.fixture
def fakeop(tmp_path, monkeypatch) -> Any:
    """A package ``fakeop`` (models.FNO, layers.SpectralConv) importable from ``tmp_path``."""
    pkg = tmp_path / "fakeop_pkg" / "fakeop"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text(FAKE_LAYERS)
    (pkg / "models.py").write_text(FAKE_MODELS)
    monkeypatch.syspath_prepend(str(pkg.parent))
    for name in [m for m in sys.modules if m == "fakeop" or m.startswith("fakeop.")]:
        monkeypatch.delitem(sys.modules, name)
    import importlib

    return importlib.import_module("fakeop.models")


def _library_state_dict(fakeop, path: Path, activation: Any) -> Any:
    torch.manual_seed(0)
    model = fakeop.FNO(non_linearity=activation)
    torch.save(model.state_dict(), path)  # what a user of the library does
    return model


FACTORY = ModelConfig(factory="fakeop.models:FNO", kwargs={"hidden_channels": 8})


@pytest.mark.parametrize(
    "activation",
    [torch.nn.functional.gelu, torch.nn.functional.relu, torch._C._nn.gelu, torch.nn.functional.silu],
    ids=["F.gelu", "F.relu", "torch._C._nn.gelu", "F.silu"],
)
def test_library_state_dict_with_metadata_loads_without_opt_in(fakeop, tmp_path, activation):
    path = tmp_path / "fno.pt"
    model = _library_state_dict(fakeop, path, activation)
    with pytest.raises(Exception, match="Unsupported global"):  # what torch alone says
        torch.load(path, weights_only=True)
    ckpt = load_checkpoint(path, FACTORY)
    assert ckpt.format == "state_dict"
    assert any("skipped non-tensor entries ['_metadata']" in w for w in ckpt.warnings)
    reference = fakeop.FNO()  # the factory's kwargs (gelu), the saved weights
    reference.load_state_dict(model.state_dict())
    x = torch.rand(4, 2)
    torch.testing.assert_close(ckpt.module(x), reference(x), atol=0, rtol=0)


def test_factory_package_classes_are_not_allowed_for_another_factory(fakeop, tmp_path):
    path = tmp_path / "fno.pt"
    _library_state_dict(fakeop, path, torch.nn.functional.gelu)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, ModelConfig(factory="mlp"))
    message = str(info.value)
    assert "refused: not plain weights (it pickles the Python object fakeop.layers.SpectralConv" in message
    assert "a state dict of fakeop loads when model.factory names its constructor ('fakeop.module:Class')" in message
    assert "model.trust_checkpoint: true" in message and "--trust-checkpoint" in message
    trusted = load_checkpoint(path, ModelConfig(factory="fakeop.models:FNO", trust_checkpoint=True))
    assert any("trust_checkpoint" in w and "any code in the file ran" in w for w in trusted.warnings)


def test_os_system_is_refused_even_with_a_trusted_factory_and_nothing_runs(fakeop, tmp_path):
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = fakeop.FNO()
    state = model.state_dict()
    state["_metadata"] = {"non_linearity": torch.nn.functional.gelu, "hook": Payload()}
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    assert not marker.exists()
    for spec in (FACTORY, ModelConfig(factory="mlp"), ModelConfig()):
        with pytest.raises(CheckpointError, match=r"evil\.pt: refused: .*(posix|os|nt)\.system.*--trust-checkpoint"):
            load_checkpoint(path, spec)
    assert not marker.exists()


def test_allow_list_refuses_names_outside_torch_math_and_the_factory_package(fakeop):
    names = [
        "torch.nn.functional.gelu",
        "torch.nn.modules.activation.GELU",
        "torch.load",  # reads files and unpickles: never
        "torch.hub.load",
        "builtins.eval",
        "fakeop.layers.SpectralConv",
        "fakeop.layers.torch",  # a module the package imports, not its own
        "os.system",
    ]
    allowed, refused = allowed_globals(names, "fakeop.models:FNO")
    assert [name for _, name in allowed] == names[:2] + ["fakeop.layers.SpectralConv"]
    assert refused == ["torch.load", "torch.hub.load", "builtins.eval", "fakeop.layers.torch", "os.system"]
    assert [name for _, name in allowed_globals(["fakeop.layers.SpectralConv"], "fakeop/models.py:FNO")[0]] == []
    # a factory in torch or the standard library does not allow its whole package
    assert allowed_globals(["torch.load", "os.system"], "torch.nn:Linear")[1] == ["torch.load", "os.system"]
    assert allowed_globals(["collections.OrderedDict"], "collections:OrderedDict")[1] == ["collections.OrderedDict"]


def test_cli_refines_a_library_state_dict_end_to_end(fakeop, files):
    path = files["dir"] / "fno.pt"
    _library_state_dict(fakeop, path, torch.nn.functional.gelu)
    cfg = files["dir"] / "fno.yaml"
    cfg.write_text("model:\n  factory: fakeop.models:FNO\n  kwargs: {hidden_channels: 8}\ndevice: cpu\n")
    out = files["dir"] / "fno.refined.pt"
    result = run("refine", path, "--data", files["data"], "--config", cfg, "--rank", RANK, "--out", out, "-q")
    assert result.exit_code == 0, output(result)
    report = report_of(out)
    assert report["output"]["format"] == "refined_state_dict"
    assert report["splits"]["train"]["after"]["rel_l2"] < report["splits"]["train"]["before"]["rel_l2"]


def test_trust_checkpoint_flag_is_recorded_in_the_report(files):
    path = files["dir"] / "whole.pt"
    state = torch.load(files["state_dict"], weights_only=True)
    state["_metadata"] = {"activation": torch.tanh}  # getattr(torch._C._VariableFunctionsClass, "tanh")
    torch.save(state, path)
    out = files["dir"] / "whole.refined.pt"
    refused = refine(path, files, out)
    assert refused.exit_code == CheckpointError.exit_code
    assert "it pickles the Python objects builtins.getattr, torch._C._VariableFunctionsClass" in output(refused)
    assert not out.exists()
    result = refine(path, files, out, "--trust-checkpoint")
    assert result.exit_code == 0, output(result)
    warnings = report_of(out)["input"]["warnings"]
    assert any("trust_checkpoint" in w for w in warnings)


# --------------------------------------------------------------------------------------------
# safetensors, Lightning, nested training checkpoints
# --------------------------------------------------------------------------------------------


def test_safetensors_is_recognised_by_content_and_written_back(files):
    from safetensors.torch import save_file

    state = torch.load(files["state_dict"], weights_only=True)
    path = files["dir"] / "weights.bin"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    ckpt = load_checkpoint(path, ModelConfig(factory="mlp", kwargs={"hidden": [16, 16]}))
    assert ckpt.format == "safetensors"
    reference = load_checkpoint(files["state_dict"], ModelConfig(factory="mlp", kwargs={"hidden": [16, 16]}))
    x = torch.rand(5, 2)
    torch.testing.assert_close(ckpt.module(x), reference.module(x), atol=0, rtol=0)
    result = run("refine", path, "--data", files["data"], "--config", files["config"], "--rank", RANK, "-q")
    assert result.exit_code == 0, output(result)
    out = files["dir"] / "weights.refined.safetensors"  # safetensors in, safetensors out
    report = report_of(out)
    assert report["input"]["format"] == "safetensors" and report["output"]["format"] == "refined_safetensors"
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:  # plain safetensors: θ0, δ, the spec in the header
        assert json.loads(fh.metadata()["model"])["factory"] == "mlp"
        assert {k.split(".", 1)[0] for k in fh.keys()} == {"theta0", "delta"}
    pickled = files["dir"] / "weights_torch.refined.pt"
    assert refine(path, files, pickled, "--format", "state-dict").exit_code == 0
    from lsr_cli.linearized import load_refined

    a, b = load_refined(out), load_refined(pickled)
    x = torch.rand(6, 2, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
    assert not torch.allclose(a(x), reference.module(x.float()).double())  # δ ≠ 0
    assert load_checkpoint(out).format == "refined_safetensors"


def _lightning(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, Any]:
    """The layout of a Lightning ``.ckpt`` (``trainer.save_checkpoint``)."""
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {prefix + k: v for k, v in state.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(120.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]}
        ],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"hidden": [16, 16], "lr": 1e-3, "activation": "tanh"},
    }


def test_lightning_checkpoint_loads_with_its_model_prefix(files):
    state = torch.load(files["state_dict"], weights_only=True)
    path = files["dir"] / "last.ckpt"
    torch.save(_lightning(state), path)
    spec = ModelConfig(factory="mlp", kwargs={"hidden": [16, 16]})
    ckpt = load_checkpoint(path, spec)
    assert set(ckpt.state_dict or {}) == set(state)
    assert any("state_dict" in w for w in ckpt.warnings)
    assert any("stripped the prefix 'model.'" in w for w in ckpt.warnings)
    explicit = load_checkpoint(path, ModelConfig(factory="mlp", kwargs={"hidden": [16, 16]}, prefix="model."))
    assert set(explicit.state_dict or {}) == set(state)


def test_model_key_and_prefix_select_a_sub_module_of_a_training_checkpoint(files):
    state = torch.load(files["state_dict"], weights_only=True)
    other = {"decoder." + k: torch.zeros_like(v) for k, v in state.items()}
    nested = {"epoch": 7, "checkpoint": {"weights": {**{"encoder." + k: v for k, v in state.items()}, **other}}}
    path = files["dir"] / "train_state.pt"
    torch.save(nested, path)
    spec = ModelConfig(factory="mlp", kwargs={"hidden": [16, 16]}, key="checkpoint/weights", prefix="encoder.")
    ckpt = load_checkpoint(path, spec)
    assert ckpt.state_dict is not None
    for k, v in state.items():
        assert torch.equal(ckpt.state_dict[k], v)
    with pytest.raises(
        CheckpointError, match=r"config.model.key 'checkpoint/params': no entry 'params'; found \['weights'\]"
    ):
        load_checkpoint(path, ModelConfig(factory="mlp", key="checkpoint/params"))
    with pytest.raises(CheckpointError, match=r"config.model.prefix 'enc\.': no entry starts with it"):
        load_checkpoint(path, ModelConfig(factory="mlp", key="checkpoint/weights", prefix="enc."))
    with pytest.raises(ConfigError, match=r"config.model.trust_checkpoint: expected true or false"):
        parse_config({"model": {"trust_checkpoint": "yes"}})


# --------------------------------------------------------------------------------------------
# the PDEBench-layout sample: no split groups, a .pt2 operator, a seeded split in the report
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pdebench_layout_sample_refines_with_a_seeded_split(tmp_path):
    out = tmp_path / "advection.refined.pt2"
    result = run(
        "refine", ROOT / "sample_data" / "pdebench_advection.pt2", "--config", ROOT / "configs" / "pdebench_operator.yaml",
        "--rank", "500", "--out", out, "-q",
    )  # fmt: skip
    assert result.exit_code == 0, output(result)
    report = report_of(out)
    splits = report["data"]["splits"]
    assert {k: v["num_samples"] for k, v in splits.items()} == {"train": 192, "val": 24, "test": 24}
    assert splits["train"]["selection"] == {"fraction": 0.8, "seed": 0, "of": 240}
    assert splits["train"]["shared_inputs"] == ["/x-coordinate[:, None]"]
    assert report["output"]["format"] == "refined_export" and report["output"]["dynamic_batch"] == [True, True]
    errors = report["splits"]["train"]
    assert errors["after"]["rel_l2"] < 0.5 * errors["before"]["rel_l2"]
