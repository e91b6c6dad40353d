"""The datasets the testbed serves, one description each: names, files, digests, classes, sources.

Adding a dataset in the IDX layout (28x28 uint8 images, 60,000 training and 10,000 test rows,
10 classes) is one entry in :data:`DATASETS`; the TF-free builder, the cache, the verification and
the splits in :mod:`research.data.idx` read everything from it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

#: The four IDX files of every dataset here, by (official split, kind).
IDX_FILES: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _sums(text: str) -> dict[str, str]:
    """``{file: digest}`` from ``sha256sum``'s output (as in the data folders' SHA256SUMS.raw)."""
    return {name: digest for digest, name in (line.split() for line in text.strip().splitlines())}


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset in the MNIST IDX layout.

    Attributes:
        name: the ``dataset`` field's value (``mnist``), also the MLflow dataset name.
        title: how people write it (``MNIST``).
        digests: SHA-256 of each *decompressed* IDX file, by file name: they identify the data
            whatever gzip made an archive, and pin every pixel, label and the row order.
        class_names: the 10 labels' names, in label order.
        url: the canonical download folder (the one tensorflow-datasets' own builder registers).
        archive_digests: (size in bytes, SHA-256) of each ``.gz`` at ``url``, as registered in
            tensorflow-datasets' ``url_checksums``; a download is checked against them.
        system_dirs: folders a distribution package installs the files into, used when no folder
            is given and they hold the files.
        homepage, licence: for the MLflow dataset and the docs.
        baselines: published test accuracies (percent) of comparable models, as
            (who and what, accuracy), for the report to place a result against.
    """

    name: str
    title: str
    digests: dict[str, str]
    class_names: tuple[str, ...]
    url: str
    archive_digests: dict[str, tuple[int, str]]
    system_dirs: tuple[Path, ...]
    homepage: str
    licence: str
    baselines: tuple[tuple[str, float], ...] = ()

    @property
    def env_var(self) -> str:
        """The environment variable naming a folder with the four files (``RESEARCH_MNIST_DIR``)."""
        return f"RESEARCH_{self.name.upper()}_DIR"

    @property
    def builder_name(self) -> str:
        """The tensorflow-datasets builder's name, and the folder under the data dir."""
        return f"{self.name}_idx"

    def files(self) -> tuple[str, ...]:
        return tuple(IDX_FILES.values())

    def source_dir(self, given: str | os.PathLike[str] | None = None) -> Path | None:
        """The folder to read the files from: ``given``, else ``$RESEARCH_<NAME>_DIR``, else a
        system folder holding the first file (Debian's package); None means download."""
        if given is None:
            given = os.environ.get(self.env_var) or None
        if given is not None:
            return Path(given).expanduser().absolute()
        for folder in self.system_dirs:
            first = folder / next(iter(self.digests))
            if first.is_file() or first.with_name(first.name + ".gz").is_file():
                return folder
        return None

    def how_to_supply(self) -> str:
        """The sentence every missing-data error ends with."""
        names = ", ".join(f"{name}.gz" for name in self.digests)
        flag = " or pass --source-dir"
        system = "".join(f", or install them under {folder}" for folder in self.system_dirs)
        return (
            f"To supply {self.title}, set {self.env_var}{flag} to a folder holding the four files "
            f"{names} (or the same names without .gz){system}."
        )


MNIST_INFO = DatasetInfo(
    name="mnist",
    title="MNIST",
    digests=_sums(
        """
        0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
        ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
        ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
        65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte
        """
    ),
    class_names=tuple(str(digit) for digit in range(10)),
    url="https://storage.googleapis.com/cvdf-datasets/mnist/",
    archive_digests={
        "t10k-images-idx3-ubyte": (
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        "t10k-labels-idx1-ubyte": (
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
        "train-images-idx3-ubyte": (
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "train-labels-idx1-ubyte": (
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
    },
    system_dirs=(),
    homepage="http://yann.lecun.com/exdb/mnist/",
    licence="CC BY-SA 3.0",
    baselines=(("Simard et al. (2003), MLP with 800 hidden units", 98.4),),
)

FASHION_MNIST_INFO = DatasetInfo(
    name="fashion_mnist",
    title="Fashion-MNIST",
    digests=_sums(
        """
        5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b  t10k-images-idx3-ubyte
        0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34  t10k-labels-idx1-ubyte
        c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888  train-images-idx3-ubyte
        bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9  train-labels-idx1-ubyte
        """
    ),
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    archive_digests={
        "t10k-images-idx3-ubyte": (
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        "t10k-labels-idx1-ubyte": (
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
        "train-images-idx3-ubyte": (
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "train-labels-idx1-ubyte": (
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
    },
    # Debian's dataset-fashion-mnist package
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    homepage="https://github.com/zalandoresearch/fashion-mnist",
    licence="MIT",
    # The dataset's own benchmark and README (also in ../shared/data/fashion-mnist/README.md).
    baselines=(
        ("scikit-learn MLPClassifier, best of the dataset's benchmark", 87.7),
        ("MLP 256-128-100, submitted to the dataset's benchmark", 88.33),
        # Small CNNs submitted to the benchmark, no augmentation (as issue 24 lists them)
        ("2 conv + pooling, submitted to the dataset's benchmark", 91.6),
        ("2 conv, under 100K parameters, submitted", 92.5),
        ("2 conv + pooling + batch norm, submitted", 93.4),
    ),
)

#: Every dataset, by its ``dataset`` field value; ``mnist`` is the default.
DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (MNIST_INFO, FASHION_MNIST_INFO)}
DEFAULT_DATASET = "mnist"


class UnknownDataset(ValueError):
    """A dataset name that is not in :data:`DATASETS`; the message lists them."""


def dataset_info(name: str) -> DatasetInfo:
    """The description of dataset ``name``, or :class:`UnknownDataset` naming the known ones."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownDataset(f"unknown dataset {name!r}{hint}; the datasets are: {', '.join(DATASETS)}")


def identify(digest: str) -> tuple[str, str] | None:
    """(dataset, file name) whose decompressed SHA-256 is ``digest``, if any: a file of another
    dataset is named as such."""
    for info in DATASETS.values():
        for file_name, known in info.digests.items():
            if known == digest:
                return info.name, file_name
    return None
