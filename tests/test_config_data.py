"""Config validation and the HDF5 reader: every user-facing message names where and what."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from lsr_cli import Config, ConfigError, DataError, parse_config, read_data
from lsr_cli.config import load_config, parse_rank


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"lsr": {"rnak": 5}}, "config.lsr.rnak: unknown key; did you mean 'rank'?"),
        ({"modle": {}}, "config.modle: unknown key; did you mean 'model'?"),
        ({"lsr": {"parameters": {"fractoin": 0.5}}}, "did you mean 'fraction'?"),
        ({"data": {"zzz": 1}}, "config.data.zzz: unknown key; valid keys:"),
        ({"lsr": {"oversampling": "ten"}}, "config.lsr.oversampling: expected an integer, got a string ('ten')"),
        ({"lsr": {"oversampling": -1}}, "config.lsr.oversampling: must be at least 0, got -1"),
        ({"lsr": {"rank": 0}}, "config.lsr.rank: must be at least 1"),
        ({"lsr": {"rank": [4, 0]}}, "ranks must be at least 1, got 0"),
        ({"lsr": {"rank": "big"}}, "expected 'auto', an integer or a comma-separated list"),
        ({"lsr": {"rank": True}}, "config.lsr.rank: expected an integer, got a boolean"),
        ({"lsr": {"growth": 1.0}}, "config.lsr.growth: must be between 1.1 and 16.0"),
        ({"lsr": {"holdout": 0.9}}, "config.lsr.holdout: must be between 0.0 and 0.5"),
        ({"lsr": {"tikhonov": "lots"}}, "config.lsr.tikhonov: expected a number"),
        ({"lsr": {"tikhonov": [0.0, "x"]}}, "config.lsr.tikhonov[1]: expected a number"),
        ({"lsr": {"truncation_rcond": 2.0}}, "config.lsr.truncation_rcond: must be between 0.0 and 1.0"),
        ({"lsr": {"parameters": {"fraction": 0}}}, "config.lsr.parameters.fraction: must be in (0, 1]"),
        ({"lsr": {"parameters": {"include": [1]}}}, "config.lsr.parameters.include: expected a list of strings"),
        ({"lsr": {"row_chunk": 0}}, "config.lsr.row_chunk: must be at least 1"),
        ({"lsr": {"exact": "no"}}, "config.lsr.exact: expected true or false, got a string ('no')"),
        ({"lsr": []}, "config.lsr: expected a mapping, got a list"),
        ({"model": {"kwargs": [1]}}, "config.model.kwargs: expected a mapping"),
        ({"model": {"factory": 3}}, "config.model.factory: expected a string or null"),
        ({"data": {"train": None}}, "config.data.train: expected a string"),
        ({"dtype": "float16"}, "config.dtype: expected one of float64, float32"),
        ({"device": "tpu"}, "config.device: expected auto, cpu, cuda or cuda:N"),
        ({"seed": -3}, "config.seed: must be at least 0"),
        ([1, 2], "config: expected a mapping at the top level, got a list"),
    ],
)
def test_bad_config_values_are_named(raw, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert needle in str(err.value)


def test_good_config_round_trip():
    cfg = parse_config(
        {
            "lsr": {"rank": "64, 16,64", "tikhonov": [0, 1e-6], "parameters": {"include": "net.*"}},
            "device": "cuda:1",
            "dtype": "float32",
            "seed": 3,
        }
    )
    assert cfg.lsr.rank == [16, 64]
    assert cfg.lsr.tikhonov == [0.0, 1e-6]
    assert cfg.lsr.parameters.include == ["net.*"]
    assert (cfg.device, cfg.dtype, cfg.seed) == ("cuda:1", "float32", 3)
    assert parse_config(None) == Config()
    assert parse_rank("x", "auto") == "auto" and parse_rank("x", "7") == 7


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lsr: {rank: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load refuses Python tags
        load_config(unsafe)


def _write(path, arrays, attrs=None):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is None:
                f.create_group(key)
            else:
                f.create_dataset(key, data=value)
        for key, (name, value) in (attrs or {}).items():
            f[key].attrs[name] = value
    return path


X = np.zeros((5, 2))
Y = np.zeros((5, 1))


@pytest.mark.parametrize(
    "arrays, attrs, needle",
    [
        (
            {"train/inputs/a": X, "train/targets": Y},
            {"train/inputs": ("order", ["a", "b"])},
            "attribute 'order' names ['b']",
        ),
        ({"train/inputs": None, "train/targets": Y}, None, "the inputs group holds no datasets"),
        ({"train/inputs": X, "train/targets/y": Y}, None, "expected a dataset of targets, found a group"),
        ({"train/inputs": np.array(["a", "b"], dtype="S1"), "train/targets": Y}, None, "expected a numeric array"),
        ({"train/inputs": np.float64(1.0), "train/targets": Y}, None, "found a scalar"),
        ({"train/inputs": np.zeros((0, 2)), "train/targets": np.zeros((0, 1))}, None, "the split has no samples"),
        ({"train/inputs": X[:4], "train/targets": Y}, None, "has 4 samples but /train/targets has 5"),
        ({"train/inputs": np.full((5, 2), np.inf), "train/targets": Y}, None, "/train/inputs: contains 10 NaN or Inf"),
        ({"other/inputs": X}, None, "training split not found (config.data.train); the file holds: other/"),
        ({"train/inputs": X}, None, "/train/targets: not found (config.data.targets); /train holds: inputs (5, 2)"),
    ],
)
def test_bad_hdf5_is_named(tmp_path, arrays, attrs, needle):
    path = _write(tmp_path / "d.h5", arrays, attrs)
    with pytest.raises(DataError) as err:
        read_data(path, Config().data, torch.float64)
    assert needle in str(err.value)
    assert "d.h5" in str(err.value)


def test_reader_dtypes_and_optional_splits(tmp_path):
    path = _write(
        tmp_path / "d.h5",
        {
            "train/inputs/b": X.astype(np.float32),
            "train/inputs/a": np.arange(5),
            "train/targets": Y,
            "test/inputs/a": np.arange(2),
            "test/inputs/b": X[:2],
            "test/targets": Y[:2],
        },
    )
    splits = read_data(path, Config().data, torch.float64)
    assert set(splits) == {"train", "test"}  # val is optional
    a, b = splits["train"].inputs  # sorted by name without an 'order' attribute
    assert a.dtype == torch.int64 and b.dtype == torch.float64
    assert splits["train"].input_names == ["/train/inputs/a", "/train/inputs/b"]
