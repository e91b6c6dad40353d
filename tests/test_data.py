"""MNIST through tensorflow-datasets: splits, canonical order, cache, verification, failures.

One data dir is prepared once per session (a cold tfds preparation takes ~10 s), right after a
failed attempt in the same dir; every other test either reads it or fails before tfds writes
anything. The data are checked against an independent parse of the IDX files in the offline MNIST
folder ($RESEARCH_MNIST_DIR, else ../shared/data/mnist beside the repo). Nothing touches the
network: "downloads" come from a local HTTP server.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from research.data import MNIST_DIGESTS, DataError, load_mnist, one_hot
from research.data import idx as data
from research.data.datasets import MNIST_INFO

NAMES = sorted(MNIST_DIGESTS)


def _source(folder: Path, name: str) -> Path:
    gz = folder / f"{name}.gz"
    return gz if gz.is_file() else folder / name


def _decompressed_file(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def _decompressed(folder: Path, name: str) -> bytes:
    return _decompressed_file(_source(folder, name))


def _parse_idx(raw: bytes) -> np.ndarray:
    """A deliberately separate IDX parser: big-endian dims after a 4-byte magic, then bytes."""
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def idx(mnist_folder: Path) -> dict[str, np.ndarray]:
    """The four IDX files parsed directly: images (N, 28, 28) uint8, labels (N,) uint8."""
    return {name: _parse_idx(_decompressed(mnist_folder, name)) for name in NAMES}


@dataclass(frozen=True)
class FirstRun:
    """What the session's one cold preparation saw (see ``first_run``)."""

    data_dir: Path
    bad_file: Path
    failure: DataError | None
    left_after_failure: list[str]


@pytest.fixture(scope="session")
def first_run(tmp_path_factory: pytest.TempPathFactory, mnist_folder: Path) -> FirstRun:
    """A data dir prepared once for the session, right after a failed attempt in the same dir.

    The failed attempt gets no ``source_dir``, so the builder takes its files from tfds' default
    manual dir (where one is corrupt): the verification then fails inside download_and_prepare,
    after tfds created its incomplete.* dir. Recording it here, instead of in a test of its own,
    saves a second cold preparation (~10 s); ``test_failure_inside_tfds_...`` checks it.
    """
    data_dir = tmp_path_factory.mktemp("data")
    manual = data_dir / "downloads" / "manual"
    manual.parent.mkdir(parents=True)
    bad = _broken_folder(mnist_folder, manual, "train-labels-idx1-ubyte", "wrong_digest")
    failure = None
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RESEARCH_MNIST_DIR", raising=False)
        try:
            load_mnist(data_dir=data_dir)
        except DataError as err:
            failure = err
    left = sorted(
        str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if "downloads" not in p.parts
    )
    load_mnist(mnist_folder, data_dir)
    return FirstRun(data_dir, bad, failure, left)


@pytest.fixture(scope="session")
def prepared(first_run: FirstRun) -> Path:
    """The session's prepared data dir (tfds copy + cache)."""
    return first_run.data_dir


def _cache_path(data_dir: Path) -> Path:
    return data_dir / "mnist_idx" / data.CACHE_NAME


# --------------------------------------------------------------------------------------------------
# The splits


def test_splits_shapes_dtypes_ranges(prepared: Path) -> None:
    mnist = load_mnist(data_dir=prepared)
    for split, n in ((mnist.train, 50_000), (mnist.validation, 10_000), (mnist.test, 10_000)):
        assert len(split) == n
        assert split.x.shape == (n, 784) and split.x.dtype == np.float32
        assert split.labels.shape == (n,) and split.labels.dtype == np.int64
        assert split.x.min() == 0.0 and split.x.max() == 1.0
        assert set(np.unique(split.labels)) == set(range(10))


def test_canonical_order(prepared: Path, idx: dict[str, np.ndarray]) -> None:
    mnist = load_mnist(data_dir=prepared, raw=True)
    train_images = idx["train-images-idx3-ubyte"].reshape(60_000, 784)
    train_labels = idx["train-labels-idx1-ubyte"]
    assert mnist.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    np.testing.assert_array_equal(mnist.train.x, train_images[:50_000])
    np.testing.assert_array_equal(mnist.train.labels, train_labels[:50_000])
    np.testing.assert_array_equal(mnist.validation.x, train_images[50_000:])
    np.testing.assert_array_equal(mnist.validation.labels, train_labels[50_000:])
    np.testing.assert_array_equal(mnist.test.x, idx["t10k-images-idx3-ubyte"].reshape(-1, 784))
    np.testing.assert_array_equal(mnist.test.labels, idx["t10k-labels-idx1-ubyte"])


def test_raw_flag(prepared: Path) -> None:
    raw = load_mnist(data_dir=prepared, raw=True)
    scaled = load_mnist(data_dir=prepared)
    for r, s in ((raw.train, scaled.train), (raw.validation, scaled.validation)):
        assert r.x.dtype == np.float32 and r.x.max() == 255.0
        np.testing.assert_array_equal(r.x, np.round(r.x))  # integral pixel values
        np.testing.assert_array_equal(s.x, r.x / np.float32(255))
        np.testing.assert_array_equal(s.labels, r.labels)


def test_env_vars_choose_the_folders(
    prepared: Path, mnist_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(prepared))
    monkeypatch.setenv("RESEARCH_MNIST_DIR", str(mnist_folder))
    assert data._resolve_data_dir(None) == prepared.absolute()
    assert MNIST_INFO.source_dir() == mnist_folder.absolute()
    assert len(load_mnist().test) == 10_000
    monkeypatch.delenv("RESEARCH_DATA_DIR")
    monkeypatch.delenv("RESEARCH_MNIST_DIR")
    assert data._resolve_data_dir(None) == Path.home() / ".cache" / "research"
    assert MNIST_INFO.source_dir() is None


# --------------------------------------------------------------------------------------------------
# The cache


def test_warm_load_uses_the_cache(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cache_path(prepared).is_file()

    def must_not_prepare(*args: object) -> None:
        raise AssertionError("tfds was called although the cache is valid")

    monkeypatch.setattr(data, "_arrays_from_tfds", must_not_prepare)
    assert load_mnist(data_dir=prepared).train.labels[:5].tolist() == [5, 0, 4, 1, 9]


def _rewrite_cache(path: Path, **changes: object) -> None:
    with np.load(path, allow_pickle=False) as npz:
        contents = {key: npz[key] for key in npz.files}
    contents.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **contents)


def test_cache_with_bad_version_is_rebuilt_from_tfds(prepared: Path, tmp_path: Path) -> None:
    cache = _cache_path(prepared)
    _rewrite_cache(cache, format_version=np.int64(0))
    empty = tmp_path / "empty"
    empty.mkdir()
    # An empty MNIST folder: the rebuild must read the prepared tfds copy, not prepare again.
    mnist = load_mnist(empty, prepared)
    assert mnist.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    with np.load(cache, allow_pickle=False) as npz:
        assert int(npz["format_version"]) == data.CACHE_FORMAT_VERSION
    assert data._read_cache(cache)[0] is not None


def _flip_one_pixel(images: np.ndarray) -> np.ndarray:
    images = images.copy()
    images[123, 456] ^= 1
    return images


@pytest.mark.parametrize(
    "corruption",
    [
        "version",
        "digests",
        "count",
        "label_dtype",
        "pixel",
        "label_range",
        "missing_key",
        "pickled",
        "truncated",
        "garbage",
    ],
)
def test_invalid_cache_is_rejected(prepared: Path, tmp_path: Path, corruption: str) -> None:
    cache = tmp_path / data.CACHE_NAME
    shutil.copyfile(_cache_path(prepared), cache)
    arrays, _ = data._read_cache(cache)
    assert arrays is not None
    if corruption == "version":
        _rewrite_cache(cache, format_version=np.int64(data.CACHE_FORMAT_VERSION + 1))
    elif corruption == "digests":
        _rewrite_cache(cache, digests=np.array(["0" * 64] * 4))
    elif corruption == "count":
        _rewrite_cache(
            cache, test_images=arrays.test_images[:-1], test_labels=arrays.test_labels[:-1]
        )
    elif corruption == "label_dtype":
        _rewrite_cache(cache, train_labels=arrays.train_labels.astype(np.int32))
    elif corruption == "pixel":
        _rewrite_cache(cache, train_images=_flip_one_pixel(arrays.train_images))
    elif corruption == "label_range":
        _rewrite_cache(cache, test_labels=arrays.test_labels + 10)
    elif corruption == "missing_key":
        with np.load(cache, allow_pickle=False) as npz:
            contents = {key: npz[key] for key in npz.files if key != "test_labels"}
        with open(cache, "wb") as f:
            np.savez(f, **contents)
    elif corruption == "pickled":
        _rewrite_cache(cache, test_labels=np.array([object()] * 10_000, dtype=object))
    elif corruption == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    else:
        cache.write_bytes(b"not a cache")
    rebuilt, why = data._read_cache(cache)
    assert rebuilt is None and why


# --------------------------------------------------------------------------------------------------
# Verification of the source files


def _broken_folder(source: Path, dest: Path, name: str, how: str) -> Path:
    """Link the four files into ``dest``, with ``name`` broken as ``how`` says; returns its path."""
    dest.mkdir()
    for other in NAMES:
        if other != name:
            os.symlink(_source(source, other), dest / _source(source, other).name)
    raw = _decompressed(source, name)
    bad = dest / f"{name}.gz"
    if how == "missing":
        pass
    elif how == "truncated_gzip":
        compressed = gzip.compress(raw, compresslevel=1)
        bad.write_bytes(compressed[: len(compressed) // 2])
    elif how == "wrong_digest":
        bad.write_bytes(gzip.compress(raw[:-1] + bytes([raw[-1] ^ 0xFF]), compresslevel=1))
    elif how == "short_raw":  # uncompressed but cut short
        bad = dest / name
        bad.write_bytes(raw[:-100])
    else:
        raise ValueError(how)
    return bad


@pytest.mark.parametrize("how", ["missing", "truncated_gzip", "wrong_digest", "short_raw"])
@pytest.mark.parametrize("name", ["t10k-labels-idx1-ubyte", "train-images-idx3-ubyte"])
def test_bad_source_file_raises_before_writing_anything(
    mnist_folder: Path, tmp_path: Path, name: str, how: str
) -> None:
    bad = _broken_folder(mnist_folder, tmp_path / "mnist", name, how)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as excinfo:
        load_mnist(tmp_path / "mnist", data_dir)
    message = str(excinfo.value)
    assert str(bad) in message
    assert MNIST_DIGESTS[name] in message
    assert "RESEARCH_MNIST_DIR" in message and "--source-dir" in message
    if how in ("wrong_digest", "short_raw"):
        assert f"is {hashlib.sha256(_decompressed_file(bad)).hexdigest()}" in message
    # The folder is checked before tfds runs: not even the data dir is created.
    assert not data_dir.exists()


def test_uncompressed_files_are_accepted(mnist_folder: Path, tmp_path: Path) -> None:
    for name in NAMES:
        (tmp_path / name).write_bytes(_decompressed(mnist_folder, name))
    paths = data._find_source_files(tmp_path, MNIST_INFO)
    assert paths == {name: tmp_path / name for name in NAMES}
    arrays = data._load_idx_files(paths, MNIST_INFO)
    assert arrays.train_labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_failure_inside_tfds_leaves_nothing_and_good_data_then_works(first_run: FirstRun) -> None:
    assert isinstance(first_run.failure, DataError)
    message = str(first_run.failure)
    assert str(first_run.bad_file) in message
    assert MNIST_DIGESTS["train-labels-idx1-ubyte"] in message
    # Neither a prepared nor a half-written dataset nor a cache survived the failure...
    assert not any(
        "1.0.0" in p or "incomplete" in p or "cache" in p for p in first_run.left_after_failure
    )
    # ...and the later call with the good folder prepared everything.
    data_dir = first_run.data_dir
    assert (data_dir / "mnist_idx" / "1.0.0" / "dataset_info.json").is_file()
    assert data._read_cache(_cache_path(data_dir))[0] is not None
    assert load_mnist(data_dir=data_dir).train.labels[:5].tolist() == [5, 0, 4, 1, 9]


# --------------------------------------------------------------------------------------------------
# Downloading (from a local HTTP server standing in for the mirror)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Talk to 127.0.0.1 directly even where CI sets a proxy."""
    for scheme in ("http", "https", "all"):
        for var in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
            monkeypatch.delenv(var, raising=False)


@pytest.fixture
def mirror(mnist_folder: Path, no_proxy: None) -> Iterator[str]:
    """A local HTTP server serving the offline folder; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(mnist_folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _download_manager(tmp_path: Path) -> Any:
    import tensorflow_datasets as tfds

    return tfds.download.DownloadManager(download_dir=tmp_path / "downloads")


def test_download_from_mirror(
    mirror: str, mnist_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not all((mnist_folder / f"{name}.gz").is_file() for name in NAMES):
        pytest.skip("the mirror serves .gz files; the offline folder holds uncompressed ones")
    # The mirror serves this folder's archives: register their sizes and digests for it.
    archives = {
        name: (len(gz), hashlib.sha256(gz).hexdigest())
        for name in NAMES
        for gz in [(mnist_folder / f"{name}.gz").read_bytes()]
    }
    info = dataclasses.replace(MNIST_INFO, url=mirror, archive_digests=archives)
    paths = data._source_files(_download_manager(tmp_path), info)
    arrays = data._load_idx_files(paths, info)
    assert arrays.train_labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_a_download_unlike_the_registered_archive_is_refused(
    mirror: str, mnist_folder: Path, tmp_path: Path
) -> None:
    """The archives registered for the public mirror (tfds' url_checksums) are not this folder's
    recompressed ones: served in their place, they are refused, naming both."""
    if not all((mnist_folder / f"{name}.gz").is_file() for name in NAMES):
        pytest.skip("the mirror serves .gz files; the offline folder holds uncompressed ones")
    info = dataclasses.replace(MNIST_INFO, url=mirror)
    with pytest.raises(DataError, match="does not match the size and SHA-256") as excinfo:
        data._source_files(_download_manager(tmp_path), info)
    assert "tensorflow-datasets registers" in str(excinfo.value)


def test_unreachable_mirror_raises_data_error_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_proxy: None
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = dataclasses.replace(MNIST_INFO, url=f"http://127.0.0.1:{port}/")
    with pytest.raises(DataError, match="Could not download") as excinfo:
        data._source_files(_download_manager(tmp_path), info)
    assert "RESEARCH_MNIST_DIR" in str(excinfo.value)


# --------------------------------------------------------------------------------------------------
# one_hot


def test_one_hot() -> None:
    labels = np.array([3, 0, 9], dtype=np.int64)
    encoded = one_hot(labels)
    assert encoded.shape == (3, 10) and encoded.dtype == np.float64
    np.testing.assert_array_equal(encoded.argmax(axis=1), labels)
    np.testing.assert_array_equal(encoded.sum(axis=1), 1.0)
    assert one_hot(labels, 12, dtype=np.float32).shape == (3, 12)
    assert one_hot(np.array([], dtype=np.int64)).shape == (0, 10)


@pytest.mark.parametrize(
    "labels", [np.array([0, 10]), np.array([-1]), np.array([0.5]), np.ones((2, 2), int)]
)
def test_one_hot_rejects_bad_labels(labels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        one_hot(labels)
