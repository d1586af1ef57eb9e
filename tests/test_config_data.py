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


# --------------------------------------------------------------------------------------------
# files without split groups (PDEBench layout): dataset paths, selections, seeded splits
# --------------------------------------------------------------------------------------------


def _pdebench(path, n=20, t=4, x=6):
    """``tensor [n, t, x]`` (value = 100 · sample + 10 · time + point: every entry says where it
    came from), ``x-coordinate [x]``, ``t-coordinate [t + 1]``."""
    tensor = (100 * np.arange(n)[:, None, None] + 10 * np.arange(t)[None, :, None] + np.arange(x)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["tensor"] = tensor
        f["x-coordinate"] = np.linspace(0, 1, x)
        f["t-coordinate"] = np.linspace(0, 1, t + 1)
    return path, tensor


PDEBENCH_DATA = {
    "inputs": ["/tensor[:, 0]", "/x-coordinate[:, None]"],
    "shared": ["/x-coordinate[:, None]"],
    "targets": "/tensor[:, -1]",
}


def test_split_by_seeded_fractions_reads_the_selected_rows(tmp_path):
    path, tensor = _pdebench(tmp_path / "advection.h5")
    cfg = parse_config({"data": {**PDEBENCH_DATA, "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 3}}})
    splits = read_data(path, cfg.data, torch.float64)
    assert {k: s.num_samples for k, s in splits.items()} == {"train": 10, "val": 5, "test": 5}
    rows = {k: (s.targets[:, 0].numpy() - 30) / 100 for k, s in splits.items()}  # sample index of each row
    together = np.concatenate(list(rows.values()))
    assert sorted(together.tolist()) == list(range(20))  # disjoint, and every sample used
    assert rows["train"].tolist() != list(range(10))  # shuffled, not the first half
    train = splits["train"]
    branch, grid = train.inputs
    np.testing.assert_array_equal(branch.numpy(), tensor[rows["train"].astype(int), 0])
    np.testing.assert_array_equal(train.targets.numpy(), tensor[rows["train"].astype(int), -1])
    assert grid.shape == (6, 1) and train.shared == (False, True)
    assert train.selection == {"fraction": 0.5, "seed": 3, "of": 20}
    again = read_data(path, cfg.data, torch.float64)  # the same seed: the same split
    assert torch.equal(again["val"].targets, splits["val"].targets)
    streamed = read_data(path, cfg.data, torch.float64, lazy_above=1)["train"].inputs[0]  # scattered rows
    assert tuple(streamed.shape) == (10, 6)
    torch.testing.assert_close(streamed[0:10], branch, atol=0, rtol=0)
    torch.testing.assert_close(streamed[torch.tensor([2, 9])], branch[[2, 9]], atol=0, rtol=0)
    other = parse_config({"data": {**PDEBENCH_DATA, "split": {"train": 0.5, "val": 0.25, "seed": 4}}})
    assert not torch.equal(read_data(path, other.data, torch.float64)["val"].targets, splits["val"].targets)


def test_split_by_row_ranges_keeps_the_order_and_streams_the_same_rows(tmp_path):
    path, tensor = _pdebench(tmp_path / "advection.h5")
    cfg = parse_config({"data": {**PDEBENCH_DATA, "split": {"train": [0, 12], "test": [15, 20]}}})
    splits = read_data(path, cfg.data, torch.float64)
    assert set(splits) == {"train", "test"}
    np.testing.assert_array_equal(splits["test"].targets.numpy(), tensor[15:20, -1])
    assert splits["test"].selection == {"rows": [15, 20], "of": 20}
    lazy = read_data(path, cfg.data, torch.float64, lazy_above=1)  # inputs stay in the file
    from lsr_cli.data import LazyArray

    branch = lazy["train"].inputs[0]
    assert isinstance(branch, LazyArray) and tuple(branch.shape) == (12, 6)
    torch.testing.assert_close(branch[2:5], splits["train"].inputs[0][2:5], atol=0, rtol=0)
    torch.testing.assert_close(branch[torch.tensor([1, 7])], splits["train"].inputs[0][[1, 7]], atol=0, rtol=0)
    shard = read_data(path, cfg.data, torch.float64, shard=(1, 2))["train"]  # rank 1 of 2
    assert (shard.first_row, shard.num_samples, shard.num_global) == (6, 6, 12)
    np.testing.assert_array_equal(shard.targets.numpy(), tensor[6:12, -1])


def test_paths_without_split_make_everything_training_data(tmp_path):
    path, tensor = _pdebench(tmp_path / "advection.h5")
    cfg = parse_config({"data": {"inputs": "/tensor[:, 1:3]", "targets": "/tensor[:, 3, 2:4]"}})
    splits = read_data(path, cfg.data, torch.float64)
    assert set(splits) == {"train"}
    assert tuple(splits["train"].inputs[0].shape) == (20, 2, 6)
    np.testing.assert_array_equal(splits["train"].targets.numpy(), tensor[:, 3, 2:4])


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"split": {"train": 0.9, "val": 0.2}}, "config.data.split: the fractions add up to 1.1, more than 1"),
        ({"split": {"val": 0.2}}, "config.data.split: needs a 'train' entry"),
        ({"split": {"train": 0.5, "tset": 0.1}}, "config.data.split.tset: unknown key"),
        ({"split": {"train": [0, 10], "val": [5, 12]}}, "config.data.split: the ranges of train and val overlap"),
        ({"split": {"train": [4, 4]}}, "config.data.split.train: the range [4, 4] holds no row"),
        ({"split": {"train": 0}}, "config.data.split.train: must be in (0, 1]"),
        ({"split": [0.8, 0.2]}, "config.data.split: expected a mapping"),
        ({"inputs": []}, "config.data.inputs: expected a dataset name or a non-empty list"),
        ({"inputs": ["/a"], "shared": ["/b"]}, "config.data.shared: '/b' is not one of config.data.inputs ['/a']"),
    ],
)
def test_bad_split_config_is_named(data, needle):
    with pytest.raises(ConfigError) as err:
        parse_config({"data": data})
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "data, needle",
    [
        (
            {"inputs": "/tensr[:, 0]", "targets": "/tensor[:, -1]"},
            "/tensr: expected a dataset, found nothing; / holds:",
        ),
        ({"inputs": "/tensor[:, 0]", "targets": "/tensor[0]"}, "the targets need their leading sample dimension whole"),
        ({"inputs": "/tensor[:, 9]", "targets": "/tensor[:, -1]"}, "/tensor[:, 9]: index 9 is out of bounds"),
        ({"inputs": "/tensor[:, x]", "targets": "/tensor[:, -1]"}, "cannot read the index 'x'"),
        (
            {"inputs": ["/tensor[:, 0]", "/x-coordinate"], "targets": "/tensor[:, -1]"},
            "/x-coordinate: has shape (6,), but the targets /tensor[:, -1] have 20 samples",
        ),
        (
            {"inputs": "/tensor[:, 0]", "targets": "/tensor[:, -1]", "split": {"train": [0, 30]}},
            "config.data.split.train [0, 30] reaches beyond the 20 samples",
        ),
        (
            {"inputs": "/tensor[:, 0]", "targets": "/tensor[:, -1]", "split": {"train": 0.9, "val": 0.01}},
            "config.data.split.val: 0.01 of 20 samples is no sample",
        ),
    ],
)
def test_bad_dataset_paths_are_named(tmp_path, data, needle):
    path, _ = _pdebench(tmp_path / "advection.h5")
    cfg = parse_config({"data": data})
    with pytest.raises(DataError) as err:
        read_data(path, cfg.data, torch.float64)
    assert needle in str(err.value)
