"""Shared fixtures: where the real MNIST and Fashion-MNIST copies are, and the loaded splits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before any test module imports numpy: the tests run the OpenBLAS kernels that users of
# `python -m research` get (research.engine.blas_kernels), whichever test files are selected.
from research.engine.blas_kernels import choose_openblas_kernels

choose_openblas_kernels()

REPO = Path(__file__).resolve().parents[1]


def offline_folder(variable: str, name: str) -> Path:
    """Where the tests read a dataset's files: ``$variable``, else ../shared/data/``name``
    beside the repo. Not checked: see :func:`mnist_source_dir`."""
    return Path(os.environ.get(variable) or REPO.parent / "shared" / "data" / name)


def mnist_source_dir() -> Path:
    """The offline MNIST folder: $RESEARCH_MNIST_DIR, else ../shared/data/mnist beside the repo.

    Tests never reach the network, so a missing folder is a failure with a clear message: in the
    tests that need it only (they ask for it, or for ``mnist_folder`` or ``mnist``).
    """
    folder = offline_folder("RESEARCH_MNIST_DIR", "mnist")
    if not folder.is_dir():
        pytest.fail(
            f"MNIST folder {folder} not found: set RESEARCH_MNIST_DIR to a folder holding the four "
            "MNIST IDX files (tests never download)"
        )
    return folder


def fashion_mnist_dir() -> Path:
    """The offline Fashion-MNIST folder: $RESEARCH_FASHION_MNIST_DIR, else
    ../shared/data/fashion-mnist beside the repo (a missing folder fails, as for MNIST)."""
    folder = offline_folder("RESEARCH_FASHION_MNIST_DIR", "fashion-mnist")
    if not folder.is_dir():
        pytest.fail(
            f"Fashion-MNIST folder {folder} not found: set RESEARCH_FASHION_MNIST_DIR to a folder "
            "holding its four IDX files (tests never download)"
        )
    return folder


@pytest.fixture(scope="session", autouse=True)
def _offline_data() -> None:
    """Subprocesses and the data loader see the offline folders, never the network: the
    variables name them even where they are missing (a load then fails with the library's
    missing-data error, not a download). Nothing is checked here, so the tests that need no data
    run without the folders."""
    os.environ["RESEARCH_MNIST_DIR"] = str(offline_folder("RESEARCH_MNIST_DIR", "mnist"))
    os.environ["RESEARCH_FASHION_MNIST_DIR"] = str(
        offline_folder("RESEARCH_FASHION_MNIST_DIR", "fashion-mnist")
    )


@pytest.fixture(scope="session")
def mnist_folder() -> Path:
    """The offline MNIST folder; the test fails if it is missing."""
    return mnist_source_dir()


@pytest.fixture(scope="session")
def mnist(mnist_folder: Path):
    """The three splits, scaled to [0, 1] (prepared once into the user's data dir)."""
    from research.data import load_mnist

    return load_mnist(mnist_folder)
