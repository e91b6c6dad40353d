"""research.engine.blas_kernels: which OpenBLAS kernels numpy runs, chosen before numpy loads it
(by ``python -m research`` at its entry; that importing the library chooses nothing is a rule of
tests/test_layout.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from research.engine.blas_kernels import (
    UNKNOWN,
    VARIABLE,
    ZEN4_KERNELS,
    choose_openblas_kernels,
    is_zen4,
    kernel_choice,
    loaded_kernels,
)

REPO = Path(__file__).resolve().parents[1]


def cpuinfo(vendor: str, family: int, flags: str, processors: int = 2) -> str:
    block = (
        "processor\t: {n}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 17\n"
        "model name\t: some CPU\nflags\t\t: fpu sse sse2 avx avx2 fma {flags}\n"
    )
    return "\n".join(
        block.format(n=n, vendor=vendor, family=family, flags=flags) for n in range(processors)
    )


ZEN4 = cpuinfo("AuthenticAMD", 25, "avx512f avx512dq avx512bw avx512vl")
ZEN3 = cpuinfo("AuthenticAMD", 25, "")  # no AVX-512: OpenBLAS already picks its Zen kernels
ZEN5 = cpuinfo("AuthenticAMD", 26, "avx512f avx512dq")  # not measured: left to OpenBLAS
SKYLAKE_X = cpuinfo("GenuineIntel", 6, "avx512f avx512dq")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(ZEN4, ZEN4_KERNELS), (ZEN3, None), (ZEN5, None), (SKYLAKE_X, None), ("", None)],
    ids=["zen4", "zen3", "zen5", "intel-avx512", "empty"],
)
def test_only_zen4_gets_other_kernels(text, expected):
    assert is_zen4(text) == (expected is not None)
    assert kernel_choice({}, text) == expected


@pytest.mark.parametrize("value", ["Prescott", "Haswell", ""])
def test_a_value_the_user_set_is_left_alone(value):
    assert kernel_choice({VARIABLE: value}, ZEN4) is None


def test_a_zen4_machine_gets_the_zen_kernels_unless_numpy_is_loaded(tmp_path, monkeypatch):
    import numpy  # noqa: F401  (loaded: the case this half of the test is about)

    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    # numpy is loaded in this process: the variable pins the kernels numpy already runs
    environ: dict[str, str] = {}
    pinned = choose_openblas_kernels(environ, str(path))
    if loaded_kernels() == UNKNOWN:  # numpy's BLAS is not OpenBLAS
        assert pinned is None and environ == {}
    else:
        assert pinned == loaded_kernels() and environ == {VARIABLE: pinned}
    # before numpy loads, the CPU decides
    monkeypatch.delitem(sys.modules, "numpy")
    environ = {}
    assert choose_openblas_kernels(environ, str(path)) == ZEN4_KERNELS
    assert environ == {VARIABLE: ZEN4_KERNELS}
    environ = {VARIABLE: "Prescott"}
    assert choose_openblas_kernels(environ, str(path)) is None
    assert environ == {VARIABLE: "Prescott"}
    environ = {}
    assert choose_openblas_kernels(environ, str(tmp_path / "missing")) is None
    assert environ == {}


PROBE = (
    "import json, os, sys\n"
    "{first}\n"
    "from research.engine.blas_kernels import loaded_kernels\n"
    "print(json.dumps({{'variable': os.environ.get({variable!r}), 'kernels': loaded_kernels()}}))\n"
)
# What `python -m research` does before any command: research.__main__.main (with --help, which
# exits once the command line is built, numpy loaded).
ENTRY = (
    "import contextlib, io, research.__main__ as entry\n"
    "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
    "    entry.main(['--help'])"
)


def probe(first: str, **environment: str) -> dict[str, str | None]:
    """What a fresh interpreter sets and runs after ``first`` (an import order)."""
    env = {key: value for key, value in os.environ.items() if key != VARIABLE}
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first, variable=VARIABLE)],
        capture_output=True, text=True, timeout=120, check=True, env=env, cwd=REPO,
    )  # fmt: skip
    return json.loads(result.stdout)


def test_the_command_chooses_the_kernels_for_this_cpu():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo: the choice is left to OpenBLAS on this system")
    found = probe(ENTRY)
    if is_zen4(text):
        # what OpenBLAS loads for Zen: named after the Haswell kernels it runs (0.3.31)
        assert found["variable"] == ZEN4_KERNELS
        assert found["kernels"] in {"Haswell", "Zen"}
    else:
        assert found["variable"] is None


def test_numpy_loaded_first_pins_its_kernels_for_worker_processes():
    found = probe(
        "import numpy\n"
        "from research.engine.blas_kernels import choose_openblas_kernels\n"
        "choose_openblas_kernels()"
    )
    if found["kernels"] == UNKNOWN:
        assert found["variable"] is None
    else:
        assert found["variable"] == found["kernels"]
    worker = probe("import numpy", **{VARIABLE: found["variable"] or ""})
    assert worker["kernels"] == found["kernels"]


def test_a_kernel_choice_of_the_user_wins():
    # Prescott: kernels every x86-64 CPU can run (OpenBLAS ignores names it does not know)
    assert probe(ENTRY, **{VARIABLE: "Prescott"})["variable"] == "Prescott"
