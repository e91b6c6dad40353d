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


def mnist_dir() -> Path:
    """The offline MNIST folder: $RESEARCH_MNIST_DIR, else ../shared/data/mnist beside the repo.

    Tests never reach the network, so a missing folder is a failure with a clear message.
    """
    folder = Path(os.environ.get("RESEARCH_MNIST_DIR") or REPO.parent / "shared" / "data" / "mnist")
    if not folder.is_dir():
        pytest.fail(
            f"MNIST folder {folder} not found: set RESEARCH_MNIST_DIR to a folder holding the four "
            "MNIST IDX files (tests never download)"
        )
    return folder


def fashion_mnist_dir() -> Path:
    """The offline Fashion-MNIST folder: $RESEARCH_FASHION_MNIST_DIR, else
    ../shared/data/fashion-mnist beside the repo (a missing folder fails, as for MNIST)."""
    folder = Path(
        os.environ.get("RESEARCH_FASHION_MNIST_DIR")
        or REPO.parent / "shared" / "data" / "fashion-mnist"
    )
    if not folder.is_dir():
        pytest.fail(
            f"Fashion-MNIST folder {folder} not found: set RESEARCH_FASHION_MNIST_DIR to a folder "
            "holding its four IDX files (tests never download)"
        )
    return folder


@pytest.fixture(scope="session", autouse=True)
def _offline_mnist() -> None:
    """Subprocesses and the data loader see the offline folders, never the network."""
    os.environ["RESEARCH_MNIST_DIR"] = str(mnist_dir())
    os.environ["RESEARCH_FASHION_MNIST_DIR"] = str(fashion_mnist_dir())


@pytest.fixture(scope="session")
def mnist():
    """The three splits, scaled to [0, 1] (prepared once into the user's data dir)."""
    from research.data import load_mnist

    return load_mnist(mnist_dir())
