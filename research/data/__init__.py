"""Datasets through tensorflow-datasets, without TensorFlow: their descriptions
(:mod:`.datasets`: MNIST, Fashion-MNIST), the TF-free builder, digests and cache (:mod:`.idx`),
the fixed train / validation / test splits of uint8 images (:mod:`.splits`) and expanded
training rows (:mod:`.augment`). Imports nothing
else of the project."""

from research.data.augment import AUGMENTS, Augment, augment_factor, augment_rows
from research.data.datasets import DATASETS, DEFAULT_DATASET, DatasetInfo, dataset_info
from research.data.idx import (
    MNIST_DIGESTS,
    N_PIXELS,
    N_TEST,
    N_TRAIN,
    N_VALIDATION,
    DataError,
    load_dataset,
    load_mnist,
    load_named,
)
from research.data.splits import (
    MNIST,
    N_CLASSES,
    Dataset,
    Split,
    one_hot,
    pixel_values,
    to_inputs,
)

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "DEFAULT_DATASET",
    "MNIST",
    "MNIST_DIGESTS",
    "N_CLASSES",
    "N_PIXELS",
    "N_TEST",
    "N_TRAIN",
    "N_VALIDATION",
    "Augment",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "Split",
    "augment_factor",
    "augment_rows",
    "dataset_info",
    "load_dataset",
    "load_mnist",
    "load_named",
    "one_hot",
    "pixel_values",
    "to_inputs",
]
