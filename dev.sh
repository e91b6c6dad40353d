#!/bin/sh
# Set-up and entry points: ./dev.sh run [study flags...] | ./dev.sh test [pytest args...]
# Each command creates .venv and installs the project from pyproject.toml when needed
# (again whenever pyproject.toml changes).
set -eu
cd "$(dirname "$0")"
VENV=.venv

setup() {
    stamp="$VENV/.installed-$(cksum < pyproject.toml | cut -d' ' -f1)"
    [ -f "$stamp" ] && return 0
    python=$(command -v python3.11 || command -v python3) || {
        echo "error: python3.11 (or python3) is needed on PATH" >&2
        exit 2
    }
    echo "setting up $VENV with $python (first run, or pyproject.toml changed)..." >&2
    "$python" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    rm -f "$VENV"/.installed-*
    touch "$stamp"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    run)
        setup
        exec "$VENV/bin/python" -m research study experiments/mnist_mlp.toml "$@"
        ;;
    test)
        setup
        "$VENV/bin/ruff" check research analysis tests scripts
        "$VENV/bin/ruff" format --check research analysis tests scripts
        # Two processes, each test file in one of them (its module fixtures built once);
        # `./dev.sh test -n 0` runs the suite in this process alone.
        exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@"
        ;;
    *)
        echo "usage: ./dev.sh run [study flags...] | ./dev.sh test [pytest args...]" >&2
        exit 2
        ;;
esac
