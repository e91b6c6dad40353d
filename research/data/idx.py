"""The datasets of :mod:`research.data.datasets`, prepared by tensorflow-datasets (without
TensorFlow) and cached as one ``.npz`` each.

The four IDX files of a dataset come either from a local folder (the ``source_dir`` argument,
else ``$RESEARCH_<NAME>_DIR``, e.g. ``RESEARCH_MNIST_DIR``, else a distribution's folder such as
``/usr/share/datasets/fashion-mnist``; handed to tfds as its manual dir) or, when there is none,
from the dataset's canonical download location through tfds' download manager (unless tfds' own
manual dir, ``<data_dir>/downloads/manual``, already holds them). Each file is checked against
the SHA-256 of its *decompressed* bytes (``DatasetInfo.digests``): those identify the data
whatever gzip produced the archive, and any mismatch, truncation or missing file raises
``DataError`` before tfds writes a single record (with a folder, before tfds even runs); a file
of another dataset is named as such. tfds then writes the records (array_record, in the original
row order) under ``<data_dir>/<name>_idx/1.0.0``; we read them back once and save the decoded
arrays as ``<data_dir>/<name>_idx/cache-v1.npz``, so every later load is a single ``np.load``.

The cache is never trusted blindly: it carries a format version and the source digests, and on
every load its arrays are re-serialized to IDX and hashed against the digests, so a stale,
truncated or tampered cache is rebuilt from the tfds copy instead of being used.

Splits (fixed, no randomness): ``train`` = rows 0..49,999 of the official training set,
``validation`` = its last 10,000 rows, ``test`` = the 10,000 official test images. Images stay
uint8 in memory (``Split.images``); ``Split.x`` and the training loop turn them into floats.

tensorflow_datasets is imported lazily: importing it is slow, and a warm load does
not need it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import socket
import struct
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from research.data.datasets import (
    DEFAULT_DATASET,
    IDX_FILES,
    MNIST_INFO,
    DatasetInfo,
    UnknownDataset,
    dataset_info,
    identify,
)
from research.data.splits import N_CLASSES, Dataset, Split

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

__all__ = ["DataError", "load_dataset", "load_mnist", "load_named"]

# SHA-256 of each decompressed IDX file: the canonical MNIST digests.
MNIST_DIGESTS: dict[str, str] = MNIST_INFO.digests

DATA_DIR_ENV = "RESEARCH_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/research")

BUILDER_VERSION = "1.0.0"
# Bump when the layout or meaning of the cache file changes; older caches are then rebuilt.
CACHE_FORMAT_VERSION = 1
CACHE_NAME = f"cache-v{CACHE_FORMAT_VERSION}.npz"

N_TRAIN_OFFICIAL = 60_000
N_TEST = 10_000
N_VALIDATION = 10_000
N_TRAIN = N_TRAIN_OFFICIAL - N_VALIDATION
IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]

_FILES = IDX_FILES
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
    """A dataset's files are missing, truncated, corrupt or another dataset's, or could not be
    fetched; or the dataset name is unknown."""


class _Arrays(NamedTuple):
    """The official sets as stored in the cache: images (N, 784) uint8, labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# --------------------------------------------------------------------------------------------------
# Public API


def load_dataset(
    name: str = DEFAULT_DATASET,
    source_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    raw: bool = False,
) -> Dataset:
    """Load the three splits of dataset ``name``, preparing them with tensorflow-datasets on the
    first call.

    Args:
        name: a key of :data:`research.data.datasets.DATASETS` (``mnist``, ``fashion_mnist``).
        source_dir: folder holding the four IDX files (``.gz`` or not); defaults to
            ``$RESEARCH_<NAME>_DIR``, then to a system folder that holds them. Without any, the
            files are downloaded from the dataset's canonical location. Only read when the tfds
            copy has not been prepared yet.
        data_dir: where tfds writes the dataset and we keep the cache; defaults to
            ``$RESEARCH_DATA_DIR``, else ``~/.cache/research``.
        raw: if True, ``Split.x`` gives the origin's raw pixel values 0..255 (still float32)
            instead of scaling them to [0, 1].
    Returns:
        ``Dataset`` whose splits hold uint8 ``images`` (N, 784) and ``labels`` (N,) int64, in the
        canonical row order; N = 50,000 / 10,000 / 10,000.
    Raises:
        DataError: an unknown name; a source file is missing, truncated, another dataset's or does
            not match the digests; or the download failed. Nothing is written to ``data_dir``
            in that case.
    """
    try:
        info = dataset_info(name)
    except UnknownDataset as error:
        raise DataError(str(error)) from None
    root = _resolve_data_dir(data_dir)
    cache_path = root / info.builder_name / CACHE_NAME
    arrays, problem = _read_cache(cache_path, info)
    if arrays is None:
        if cache_path.exists():
            _say(f"Rebuilding the {info.title} cache {cache_path} ({problem}).")
        try:
            arrays = _arrays_from_tfds(info, info.source_dir(source_dir), root)
            _write_cache(cache_path, arrays, info)
        except OSError as error:  # an unwritable or full data dir, inside tfds or our cache
            where = error.filename or root
            raise DataError(
                f"cannot write the prepared {info.title} data under {root} ({where}: "
                f"{error.strerror or error}); set RESEARCH_DATA_DIR or pass --data-dir to a "
                "writable folder"
            ) from None
    return _to_splits(arrays, info, raw=raw)


def load_named(
    name: str,
    source_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    raw: bool = False,
) -> Dataset:
    """``load_dataset`` as the commands call it: ``source_dir`` (``--source-dir``, or its old
    name ``--mnist-dir``) is the folder of whichever dataset ``name`` is; without it each
    dataset finds its files through ``RESEARCH_<NAME>_DIR``."""
    return load_dataset(name, source_dir, data_dir, raw=raw)


def load_mnist(
    source_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    raw: bool = False,
) -> Dataset:
    """``load_dataset("mnist", source_dir, data_dir, raw=raw)``."""
    return load_dataset("mnist", source_dir, data_dir, raw=raw)


# --------------------------------------------------------------------------------------------------
# Locations


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser().absolute()


def _prepared_dir(root: Path, info: DatasetInfo) -> Path:
    """Where tfds keeps the prepared dataset (it only appears once complete, via a rename)."""
    return root / info.builder_name / BUILDER_VERSION


def _is_prepared(root: Path, info: DatasetInfo) -> bool:
    return (_prepared_dir(root, info) / "dataset_info.json").is_file()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# IDX files: locate, decompress, verify, parse


def _find_source_files(folder: Path, info: DatasetInfo) -> dict[str, Path]:
    """Map each IDX name to its file in ``folder`` (the ``.gz`` preferred), or raise DataError."""
    found = {}
    for name, digest in info.digests.items():
        # Prefer the archive: an interrupted gunzip can leave a truncated raw file beside it.
        candidates = [folder / f"{name}.gz", folder / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            why = (
                f"nor is {candidates[1].name} there"
                if folder.is_dir()
                else f"the folder {folder} does not exist"
            )
            raise DataError(
                f"{info.title} file {candidates[0]} is missing ({why}); "
                f"expected SHA-256 of the decompressed file: {digest}. {info.how_to_supply()}"
            )
        found[name] = path
    return found


def _read_verified(name: str, path: Path, info: DatasetInfo) -> bytes:
    """The decompressed bytes of IDX file ``name`` at ``path``, checked against its digest."""
    expected = info.digests[name]
    try:
        data = path.read_bytes()
        # Sniff rather than trust the suffix: an IDX file never starts with the gzip magic.
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{info.title} file {path} could not be read or decompressed, it may be truncated "
            f"({err}); expected SHA-256 of the decompressed file: {expected}. "
            f"{info.how_to_supply()}"
        ) from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        known = identify(actual)
        if known is not None:
            other, other_name = known
            raise DataError(
                f"{path} is {dataset_info(other).title}'s {other_name}, not {info.title}'s "
                f"{name}: the folder holds another dataset's files. {info.how_to_supply()}"
            )
        raise DataError(
            f"{info.title} file {path} is corrupt: the SHA-256 of its decompressed contents "
            f"({len(data)} bytes) is {actual}, expected {expected}. {info.how_to_supply()}"
        )
    return data


def _parse_idx(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Parse an unsigned-byte IDX file into a uint8 array of ``shape``."""
    ndim = len(shape)
    # The magic number: two zero bytes, 0x08 for unsigned bytes, then the number of dimensions.
    if data[:4] != bytes([0, 0, 0x08, ndim]):
        raise DataError(f"not an unsigned-byte IDX file with {ndim} dimensions: {data[:4]!r}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    if dims != shape:
        raise DataError(f"IDX dimensions {dims}, expected {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_idx_files(paths: dict[str, Path], info: DatasetInfo) -> _Arrays:
    """Verify and parse the four IDX files into ``_Arrays`` (images flattened to (N, 784))."""
    out = {}
    for (split, kind), name in _FILES.items():
        n = N_TRAIN_OFFICIAL if split == "train" else N_TEST
        data = _read_verified(name, paths[name], info)
        if kind == "images":
            out[f"{split}_images"] = _parse_idx(data, (n, *IMAGE_SHAPE)).reshape(n, N_PIXELS)
        else:
            out[f"{split}_labels"] = _parse_idx(data, (n,)).astype(np.int64)
    return _Arrays(**out)


def _idx_digest(array: np.ndarray, shape: tuple[int, ...]) -> str:
    """SHA-256 of the IDX file that ``array`` (values 0..255) would be stored as, with ``shape``."""
    header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    digest = hashlib.sha256(header)
    digest.update(memoryview(np.ascontiguousarray(array, dtype=np.uint8)))  # no copy for images
    return digest.hexdigest()


def _check_arrays(arrays: _Arrays, info: DatasetInfo) -> str | None:
    """Why ``arrays`` are not exactly the canonical dataset, or None when they are.

    Shapes and dtypes first (cheap), then the IDX bytes they serialize to against the
    dataset's digests, which pin every pixel and label and the row order.
    """
    for (split, kind), name in _FILES.items():
        n = N_TRAIN_OFFICIAL if split == "train" else N_TEST
        array = getattr(arrays, f"{split}_{kind}")
        dtype, shape = (np.uint8, (n, N_PIXELS)) if kind == "images" else (np.int64, (n,))
        if array.dtype != dtype or array.shape != shape:
            return (
                f"{split}_{kind} is {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}"
            )
        if kind == "labels" and (array.min() < 0 or array.max() >= N_CLASSES):
            return f"{split}_labels outside 0..{N_CLASSES - 1}"
        idx_shape = (n, *IMAGE_SHAPE) if kind == "images" else (n,)
        if _idx_digest(array, idx_shape) != info.digests[name]:
            return f"{split}_{kind} does not match the SHA-256 of {name}"
    return None


# --------------------------------------------------------------------------------------------------
# The cache


def _read_cache(path: Path, info: DatasetInfo = MNIST_INFO) -> tuple[_Arrays | None, str]:
    """The cached arrays if the cache at ``path`` is present and valid, else (None, why not)."""
    if not path.is_file():
        return None, "no cache"
    try:
        # Open the file ourselves: np.load leaks its own handle when the zip is truncated.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            version = int(npz["format_version"])
            if version != CACHE_FORMAT_VERSION:
                return None, f"cache format {version}, expected {CACHE_FORMAT_VERSION}"
            digests = dict(zip(npz["digest_names"].tolist(), npz["digests"].tolist(), strict=True))
            if digests != info.digests:
                return None, "cache built from other source files"
            arrays = _Arrays(**{field: npz[field] for field in _Arrays._fields})
    # Whatever makes the file unreadable (truncated zip, missing key, pickled object...), the
    # answer is the same: rebuild it rather than trust it.
    except Exception as err:
        return None, f"unreadable cache: {type(err).__name__}: {err}"
    problem = _check_arrays(arrays, info)
    return (None, f"invalid cache: {problem}") if problem else (arrays, "")


def _write_cache(path: Path, arrays: _Arrays, info: DatasetInfo = MNIST_INFO) -> None:
    """Save ``arrays`` to ``path`` atomically: write a unique temp file, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    names = sorted(info.digests)
    try:
        with open(tmp, "wb") as f:
            # Uncompressed: the pixels compress ~5x, but inflating them costs more than reading.
            np.savez(
                f,
                format_version=np.int64(CACHE_FORMAT_VERSION),
                digest_names=np.array(names),
                digests=np.array([info.digests[n] for n in names]),
                **arrays._asdict(),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _to_splits(arrays: _Arrays, info: DatasetInfo, *, raw: bool) -> Dataset:
    """Cut the official sets into train/validation/test (uint8 views; ``raw`` for ``Split.x``)."""
    images, labels = arrays.train_images, arrays.train_labels
    return Dataset(
        # Views into one array; the validation rows are the last 10,000 of the official train set.
        train=Split(images[:N_TRAIN], labels[:N_TRAIN], raw),
        validation=Split(images[N_TRAIN:], labels[N_TRAIN:], raw),
        test=Split(arrays.test_images, arrays.test_labels, raw),
        info=info,
    )


# --------------------------------------------------------------------------------------------------
# tensorflow-datasets


@functools.cache
def _builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
    """The tfds builder of dataset ``name``, defined on first use so that importing this module
    stays light."""
    import tensorflow_datasets as tfds

    info = dataset_info(name)

    # skip_registration: the builder is used directly, never looked up by name, and registering
    # would make a second definition (e.g. after importlib.reload) fail on the duplicate name.
    class IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A dataset from its four IDX files, verified against its digests, in canonical order."""

        name = info.builder_name
        VERSION = tfds.core.Version(BUILDER_VERSION)
        RELEASE_NOTES: ClassVar[dict[str, str]] = {BUILDER_VERSION: "Initial release."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = info.how_to_supply()

        def _info(self) -> tfds.core.DatasetInfo:
            # DatasetInfo directly: dataset_info_from_configs() looks for metadata files next to
            # the module, which only exist for builders inside a tfds dataset package.
            return tfds.core.DatasetInfo(
                builder=self,
                description=(
                    f"{info.title} in the original IDX row order (index = row in the IDX file)."
                ),
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                        "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                        "index": tfds.features.Tensor(shape=(), dtype=np.int64),
                    }
                ),
                supervised_keys=("image", "label"),
                homepage=info.homepage,
                # tfds otherwise shuffles records by key hash when writing; the row order matters
                # (validation = the last 10,000 training rows). `index` double-checks it on read.
                disable_shuffling=True,
            )

        def _split_generators(
            self, dl_manager: tfds.download.DownloadManager
        ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
            # Everything is verified here, before tfds writes a single record.
            arrays = _load_idx_files(_source_files(dl_manager, info), info)
            return {
                "train": self._generate_examples(arrays.train_images, arrays.train_labels),
                "test": self._generate_examples(arrays.test_images, arrays.test_labels),
            }

        def _generate_examples(
            self, images: np.ndarray, labels: np.ndarray
        ) -> Iterator[tuple[int, dict[str, Any]]]:
            """Yield (row, example) for images (N, 784) uint8 and labels (N,) int64."""
            for i in range(labels.shape[0]):
                yield i, {"image": images[i].reshape(IMAGE_SHAPE), "label": labels[i], "index": i}

    return IdxBuilder


def _source_files(
    dl_manager: tfds.download.DownloadManager, info: DatasetInfo = MNIST_INFO
) -> dict[str, Path]:
    """The IDX files: from tfds' manual dir if it holds any of them, else downloaded from the
    dataset's canonical location (each archive checked against its registered size and digest)."""
    try:
        manual_dir: Path | None = Path(dl_manager.manual_dir)
    except AssertionError:  # tfds' way of saying the manual dir is absent or empty
        manual_dir = None
    if manual_dir is not None and any(
        (manual_dir / n).is_file() or (manual_dir / f"{n}.gz").is_file() for n in info.digests
    ):
        return _find_source_files(manual_dir, info)
    urls = {name: f"{info.url}{name}.gz" for name in info.digests}
    try:
        # tfds retries a failing download for minutes; an unreachable host is known in a moment.
        _probe(info.url)
        paths = {name: Path(p) for name, p in dl_manager.download(urls).items()}
    except Exception as err:  # network errors come in many types; all mean the same here
        raise DataError(
            f"Could not download the {info.title} files from {info.url} "
            f"({type(err).__name__}: {err}). {info.how_to_supply()}"
        ) from err
    for name, path in paths.items():
        size, digest = info.archive_digests[name]
        data = path.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise DataError(
                f"the download {urls[name]} ({len(data)} bytes) does not match the size and "
                f"SHA-256 tensorflow-datasets registers for it ({size} bytes, {digest}). "
                f"{info.how_to_supply()}"
            )
    return paths


def _probe(url: str, timeout: float = 10.0) -> None:
    """Raise OSError unless a TCP connection to the host of ``url`` can be opened.

    Skipped behind a proxy, where only the proxy knows whether the host is reachable.
    """
    import urllib.parse
    import urllib.request  # slow to import, so only on this rare path

    parts = urllib.parse.urlsplit(url)
    if urllib.request.getproxies().get(parts.scheme):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout):
        pass


def _arrays_from_tfds(info: DatasetInfo, source_dir: Path | None, root: Path) -> _Arrays:
    """Prepare the tfds dataset under ``root`` if needed, and read it back into ``_Arrays``.

    Args:
        info: the dataset.
        source_dir: local folder with the IDX files (tfds' manual dir), or None to download.
        root: the tfds data_dir.
    """
    if not _is_prepared(root, info) and source_dir is not None:
        # Fail on a bad folder before importing tfds or creating anything under root.
        _load_idx_files(_find_source_files(source_dir, info), info)

    import tensorflow_datasets as tfds

    builder = _builder_class(info.name)(data_dir=os.fspath(root), file_format="array_record")
    if not _is_prepared(root, info):
        _say(f"Preparing {info.title} with tensorflow-datasets in {root} (first run only)...")
        config = tfds.download.DownloadConfig(
            manual_dir=None if source_dir is None else os.fspath(source_dir),
            # Otherwise tfds first asks GCS for a prepared copy of "<name>_idx" (a network call).
            try_download_gcs=False,
        )
        with _quiet_tfds(tfds):
            try:
                builder.download_and_prepare(download_config=config)
            except OSError:
                # tfds prepares into incomplete.* and renames; the rename fails if another
                # process finished first, and then its copy is as good as ours.
                if not _is_prepared(root, info):
                    raise
    try:
        return _read_prepared(builder, info)
    except DataError:
        raise
    except Exception as err:  # whatever array_record or tfds raise on a damaged copy
        raise DataError(
            f"The tensorflow-datasets copy in {builder.data_dir} could not be read "
            f"({type(err).__name__}: {err}); delete that folder to prepare it again."
        ) from err


@contextlib.contextmanager
def _quiet_tfds(tfds: Any) -> Iterator[None]:
    """Hide tfds' progress bars and send its status prints to stderr, keeping stdout clean."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        tfds.display_progress_bar(was_active)


def _read_prepared(builder: tfds.core.GeneratorBasedBuilder, info: DatasetInfo) -> _Arrays:
    """Read the prepared train/test records back into ``_Arrays``, placed by their ``index``."""
    out = {}
    sources = builder.as_data_source()
    for split, n in (("train", N_TRAIN_OFFICIAL), ("test", N_TEST)):
        records = sources[split].__getitems__(list(range(len(sources[split]))))
        index = np.array([r["index"] for r in records], dtype=np.int64)
        if len(records) != n or not np.array_equal(np.sort(index), np.arange(n)):
            raise DataError(
                f"The tensorflow-datasets copy in {builder.data_dir} has a broken {split} split "
                f"({len(records)} records, expected {n}); delete that folder to prepare it again."
            )
        images = np.empty((n, N_PIXELS), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        # Place rows by their original index so the result is canonical even if tfds reordered.
        images[index] = np.stack([r["image"].reshape(N_PIXELS) for r in records])
        labels[index] = [r["label"] for r in records]
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    arrays = _Arrays(**out)
    problem = _check_arrays(arrays, info)
    if problem:
        raise DataError(
            f"The tensorflow-datasets copy in {builder.data_dir} does not hold canonical "
            f"{info.title} ({problem}); delete that folder to prepare it again."
        )
    return arrays
