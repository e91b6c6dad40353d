"""More than one dataset through the same TF-free tensorflow-datasets layer: the descriptions,
Fashion-MNIST's builder, digests, splits and cache from ../shared/data/fashion-mnist, the
offline sources (a folder by environment variable, a distribution's folder), wrong files refused
in one clear line with nothing written, and ``dataset`` as a training field end to end: a tiny
study on Fashion-MNIST through the real command, its MLflow dataset inputs, ``rerun``."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import fashion_mnist_dir, mnist_source_dir
from test_study import artifact_paths, mlflow_client, run_cli, sqlite_uri, study_runs

from research.data import DATASETS, DataError, dataset_info, load_dataset, load_named
from research.data import idx as data
from research.data.datasets import FASHION_MNIST_INFO, IDX_FILES, MNIST_INFO, identify
from research.experiment.config.fields import FIELDS, ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[1]
FASHION_MLP = REPO / "experiments" / "fashion_mlp.toml"
NAMES = tuple(IDX_FILES.values())


@pytest.fixture(scope="module")
def fashion_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir where Fashion-MNIST was prepared once, from the offline folder."""
    root = tmp_path_factory.mktemp("fashion-data")
    load_dataset("fashion_mnist", fashion_mnist_dir(), root)
    return root


def idx_arrays(folder: Path) -> dict[str, np.ndarray]:
    """The four IDX files of ``folder`` parsed independently of the data layer."""
    out = {}
    for name in NAMES:
        raw = gzip.decompress((folder / f"{name}.gz").read_bytes())
        ndim = raw[3]
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        out[name] = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return out


# --- the descriptions ---------------------------------------------------------------------------


def test_each_dataset_is_described_once_with_its_files_classes_and_sources():
    assert list(DATASETS) == ["mnist", "fashion_mnist"]
    for info in DATASETS.values():
        assert set(info.digests) == set(NAMES)
        assert len(info.class_names) == 10 and len(set(info.class_names)) == 10
        assert set(info.archive_digests) == set(NAMES)
        assert info.url.endswith("/") and info.env_var == f"RESEARCH_{info.name.upper()}_DIR"
    assert FASHION_MNIST_INFO.class_names[:3] == ("T-shirt/top", "Trouser", "Pullover")
    assert FASHION_MNIST_INFO.class_names[9] == "Ankle boot"
    assert MNIST_INFO.class_names == tuple("0123456789")
    # builders and caches of different datasets never share a folder
    assert len({info.builder_name for info in DATASETS.values()}) == len(DATASETS)
    assert MNIST_INFO.builder_name == "mnist_idx"  # caches of earlier versions stay valid
    assert Path("/usr/share/datasets/fashion-mnist") in FASHION_MNIST_INFO.system_dirs


def test_the_digests_are_those_of_the_shared_folders_and_the_tfds_registry():
    for info, folder in (
        (MNIST_INFO, mnist_source_dir()),
        (FASHION_MNIST_INFO, fashion_mnist_dir()),
    ):
        sums = dict(
            reversed(line.split()) for line in (folder / "SHA256SUMS.raw").read_text().splitlines()
        )
        assert sums == info.digests
    # tensorflow-datasets' own registry of the download location's archives
    import tensorflow_datasets

    registry = Path(tensorflow_datasets.__file__).parent / "url_checksums"
    for info, file in ((MNIST_INFO, "mnist.txt"), (FASHION_MNIST_INFO, "fashion_mnist.txt")):
        registered = {}
        for line in (registry / file).read_text().splitlines():
            url, size, digest, _ = line.split("\t")
            registered[url] = (int(size), digest)
        assert {f"{info.url}{n}.gz": v for n, v in info.archive_digests.items()} == registered


def test_an_unknown_dataset_is_one_line_with_the_known_ones():
    with pytest.raises(DataError, match=r"unknown dataset 'fashion'.*'fashion_mnist'"):
        load_dataset("fashion")
    with pytest.raises(ValueError, match="the datasets are: mnist, fashion_mnist"):
        dataset_info("cifar10")
    assert identify(MNIST_INFO.digests["t10k-labels-idx1-ubyte"]) == (
        "mnist",
        "t10k-labels-idx1-ubyte",
    )
    assert identify("0" * 64) is None


# --- Fashion-MNIST through the builder ----------------------------------------------------------


def test_fashion_mnist_splits_are_the_canonical_rows_as_uint8(fashion_data_dir: Path):
    fashion = load_dataset("fashion_mnist", data_dir=fashion_data_dir)
    files = idx_arrays(fashion_mnist_dir())
    train_images = files["train-images-idx3-ubyte"].reshape(60_000, 784)
    assert fashion.info is FASHION_MNIST_INFO
    for split, n in ((fashion.train, 50_000), (fashion.validation, 10_000), (fashion.test, 10_000)):
        assert len(split) == n and split.images.dtype == np.uint8
        assert split.images.shape == (n, 784) and split.labels.dtype == np.int64
        assert set(np.unique(split.labels)) == set(range(10))
    assert fashion.train.labels[:5].tolist() == [9, 0, 0, 3, 0]
    np.testing.assert_array_equal(fashion.train.images, train_images[:50_000])
    np.testing.assert_array_equal(fashion.validation.images, train_images[50_000:])
    np.testing.assert_array_equal(
        fashion.validation.labels, files["train-labels-idx1-ubyte"][50_000:]
    )
    np.testing.assert_array_equal(
        fashion.test.images, files["t10k-images-idx3-ubyte"].reshape(-1, 784)
    )
    # the float inputs: k/255 in float32, or the raw bytes
    x = fashion.test.x
    assert x.dtype == np.float32 and x.max() == 1.0
    np.testing.assert_array_equal(x, fashion.test.images / np.float32(255))
    raw = load_dataset("fashion_mnist", data_dir=fashion_data_dir, raw=True)
    np.testing.assert_array_equal(raw.test.x, fashion.test.images.astype(np.float32))


def test_fashion_mnist_is_cached_beside_mnist_and_read_back_without_tfds(
    fashion_data_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = fashion_data_dir / "fashion_mnist_idx" / data.CACHE_NAME
    assert cache.is_file()
    assert (fashion_data_dir / "fashion_mnist_idx" / "1.0.0" / "dataset_info.json").is_file()

    def no_tfds(*args, **kwargs):
        raise AssertionError("a warm load must not prepare anything")

    monkeypatch.setattr(data, "_arrays_from_tfds", no_tfds)
    assert len(load_dataset("fashion_mnist", data_dir=fashion_data_dir).test) == 10_000
    # one dataset's cache in the other's place is not taken for it
    arrays, why = data._read_cache(cache, MNIST_INFO)
    assert arrays is None and why == "cache built from other source files"


def test_a_distribution_folder_is_an_offline_source_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Debian's dataset-fashion-mnist installs the files under /usr/share/datasets/; with no
    folder given, that folder is used (here: a copy, as the package lays it out)."""
    system = tmp_path / "usr-share-datasets" / "fashion-mnist"
    shutil.copytree(fashion_mnist_dir(), system)
    info = dataclasses.replace(FASHION_MNIST_INFO, system_dirs=(system,))
    monkeypatch.delenv(info.env_var)
    assert info.source_dir() == system
    assert dataclasses.replace(info, system_dirs=(tmp_path / "absent",)).source_dir() is None
    monkeypatch.setitem(DATASETS, "fashion_mnist", info)
    fashion = load_dataset("fashion_mnist", data_dir=tmp_path / "data")
    assert fashion.train.labels[:5].tolist() == [9, 0, 0, 3, 0]
    # a folder given (environment variable) comes before it
    monkeypatch.setenv(info.env_var, str(tmp_path / "given"))
    assert info.source_dir() == tmp_path / "given"


@pytest.mark.parametrize("mix", ["all", "one"])
def test_another_datasets_files_are_refused_naming_them(tmp_path: Path, mix: str):
    """MNIST's files where Fashion-MNIST's are expected (all four, or one among Fashion's):
    one line naming the file and whose it is; nothing is written to the data dir."""
    folder = tmp_path / "files"
    shutil.copytree(fashion_mnist_dir(), folder)
    swapped = NAMES if mix == "all" else ("train-labels-idx1-ubyte",)
    for name in swapped:
        shutil.copy(mnist_source_dir() / f"{name}.gz", folder / f"{name}.gz")
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion_mnist", folder, data_dir)
    message = str(excinfo.value)
    assert "\n" not in message
    first = next(name for name in NAMES if name in swapped)  # (checked in this order)
    assert f"{folder / (first + '.gz')} is MNIST's {first}, not Fashion-MNIST's {first}" in message
    assert "RESEARCH_FASHION_MNIST_DIR" in message
    assert not data_dir.exists()


def test_a_corrupt_fashion_file_is_named_with_its_digest(tmp_path: Path):
    folder = tmp_path / "files"
    shutil.copytree(fashion_mnist_dir(), folder)
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[-1] ^= 1
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError) as excinfo:
        load_dataset("fashion_mnist", folder, tmp_path / "data")
    message = str(excinfo.value)
    assert f"Fashion-MNIST file {bad} is corrupt" in message
    assert hashlib.sha256(bytes(raw)).hexdigest() in message
    assert FASHION_MNIST_INFO.digests["t10k-labels-idx1-ubyte"] in message


def test_the_source_folder_serves_whichever_dataset_is_asked_for(tmp_path: Path):
    """``--source-dir`` (old name ``--mnist-dir``) is the folder of the run's dataset, MNIST or
    not: a Fashion-MNIST run reads it (and names it when the files are not there)."""
    with pytest.raises(DataError, match="/nonexistent/source"):
        load_named("fashion_mnist", "/nonexistent/source", tmp_path / "fresh")


def test_mnist_dir_is_the_old_name_of_source_dir():
    from research.arguments import build_parser

    parser = build_parser()
    for flag in ("--source-dir", "--mnist-dir"):
        args = parser.parse_args(["train", flag, "/some/folder"])
        assert args.source_dir == "/some/folder"


# --- the training field -------------------------------------------------------------------------


def test_dataset_is_a_training_field_fixed_per_study():
    field = FIELDS["dataset"]
    assert field.choices == tuple(DATASETS) and field.default == "mnist"
    assert not field.searchable
    assert TrainConfig(dataset="fashion_mnist").dataset == "fashion_mnist"
    with pytest.raises(ConfigError, match='did you mean "fashion_mnist"'):
        TrainConfig(dataset="fashion")
    config, missing = TrainConfig.from_params({"hidden_size": "64"})
    assert config.dataset == "mnist" and "dataset" in missing  # runs logged before it


def test_train_on_fashion_logs_the_dataset_and_reruns(tmp_path: Path):
    uri = sqlite_uri(tmp_path)
    code, out, err = run_cli(
        ["train", "--dataset", "fashion_mnist", "--epochs", "1", "--subset", "1000",
         "--hidden-size", "32", "--tracking-uri", uri, "--quiet"]
    )  # fmt: skip
    assert code == 0, out + err
    assert "on Fashion-MNIST" in out and "experiment 'train_fashion_mnist'" in out
    client = mlflow_client(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("train_fashion_mnist").experiment_id]
    )
    assert run.data.params["dataset"] == "fashion_mnist"
    inputs = {
        tag.value: entry.dataset
        for entry in run.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    }
    assert set(inputs) == {"training", "validation"}
    assert {d.name for d in inputs.values()} == {"fashion_mnist"}
    assert '"split": "train[0:1000]"' in inputs["training"].profile
    assert '"split": "train[50000:60000]"' in inputs["validation"].profile
    assert inputs["training"].digest != inputs["validation"].digest
    code, out, err = run_cli(["rerun", run.info.run_id, "--tracking-uri", uri])
    assert code == 0, out + err
    assert "reproduced exactly" in out


def test_a_tiny_study_on_each_dataset_through_the_real_command(tmp_path: Path):
    """The shipped Fashion-MNIST study, cut to 2 trials of 1 epoch on 2,000 rows (MNIST's
    shipped study runs the same way in test_study.py): every trial trains on Fashion-MNIST and
    says so, and the refit is tested on Fashion-MNIST's test split."""
    uri = sqlite_uri(tmp_path)
    code, out, err = run_cli(
        ["study", str(FASHION_MLP), "--n-trials", "2", "--epochs", "1", "--subset", "2000",
         "--tracking-uri", uri, "--quiet"]
    )  # fmt: skip
    assert code == 0, out + err
    assert "test_accuracy of the retrained best configuration" in out
    parents, children = study_runs(uri, "fashion_mlp")
    assert len(parents) == 1 and len(children) == 2
    for run in children:
        assert run.data.params["dataset"] == "fashion_mnist"
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fashion_mnist"}
    (parent,) = parents
    # the refit (on the parent): trained on the subset and the validation rows, tested once
    profiles = {
        tag.value: entry.dataset.profile
        for entry in parent.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    }
    assert '"split": "train[0:2000]+train[50000:60000]", "num_rows": 12000' in profiles["training"]
    assert '"split": "test[0:10000]", "num_rows": 10000' in profiles["test"]
    # 1 epoch on 12,000 rows still beats chance (10%) on the test split by far
    assert parent.data.metrics["test_accuracy"] > 0.5
    assert {"best_weights.npz", "best_weights.txt"} <= artifact_paths(uri, parent.info.run_id)


def test_a_dataset_in_the_search_is_refused(tmp_path: Path):
    text = (
        FASHION_MLP.read_text()
        .replace(
            "[search.batch_size]",
            '[search.dataset]\ntype = "categorical"\nchoices = ["mnist", '
            '"fashion_mnist"]\n\n[search.batch_size]',
        )
        .replace('dataset = "fashion_mnist"', "")
    )
    study = tmp_path / "bad.toml"
    study.write_text(text)
    code, out, err = run_cli(["study", str(study), "--tracking-uri", sqlite_uri(tmp_path)])
    assert code == 2, out + err
    assert "a study compares models on one dataset" in err
