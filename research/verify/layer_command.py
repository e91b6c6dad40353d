"""``python -m research verify-layer FILE.py:NAME``: a researcher's own layer through the whole bar.

It loads the layer (:mod:`research.engine.layers.user_file`), runs
:func:`~research.verify.layer_suite.check_layer` and prints its tables. Exit codes: 0 every check
passes, 1 a check fails, 2 the layer cannot be used (no file, an import error, no such name, a
missing method, a forward that does not run under ``jax.numpy`` or takes none of the shapes),
said in one line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

from research.engine.layers.user_file import USER_LAYER, UserLayerError, load_layer

EXIT_FAILED = 1
EXIT_UNUSABLE = 2


def shape(text: str) -> tuple[int, ...]:
    """``3,8,8`` as (3, 8, 8): one example's shape, positive integers."""
    try:
        numbers = tuple(int(part) for part in text.split(","))
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no shape; give positive integers separated by commas, e.g. 3,8,8"
        )
    return numbers


def add_verify_layer_command(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "verify-layer",
        help="check your own layer's handwritten backward against JAX autodiff (docs/layers.md)",
        description="Check a layer of your own (init, forward written against numpy or "
        "jax.numpy, a handwritten numpy backward) against jax.vjp of its own forward in float64 "
        "(1e-10) and float32, against central finite differences, on non-contiguous inputs, "
        "per sample against batched, at several input shapes, and that it changes none of its "
        "inputs. Exit codes: 0 passes, 1 a check fails, 2 the file cannot be used.",
    )
    command.add_argument(
        "layer", metavar="FILE.py:NAME", help="the file and the class (or object) in it, e.g. "
        "my_layers.py:Swish; numbers in parentheses go to the class: my_layers.py:Gate(16)",
    )  # fmt: skip
    command.add_argument(
        "--shape", type=shape, action="append", metavar="C,H,W",
        help="one example's input shape, without the batch axis (repeat for several; default "
        "6 and 3,6,5, skipping those the layer refuses)",
    )  # fmt: skip
    command.add_argument(
        "--batch-size", dest="batch", type=int, default=4, help="examples per batch (default 4)"
    )
    command.add_argument("--seed", type=int, default=0, help="the draws' seed (default 0)")
    command.add_argument(
        "--brief",
        action="store_true",
        help="one line per check; tables only of the checks that fail",
    )


def run_verify_layer(args: argparse.Namespace) -> int:
    """The command; returns its exit code."""
    from research.engine.layers.parse import LayersError, tokenize
    from research.verify.layer_suite import LayerUnusable, check_layer, format_report

    not_a_layer = (
        f"{args.layer!r} is not FILE.py:NAME (e.g. my_layers.py:Swish; the path may hold no "
        "spaces, colons, parentheses or commas)"
    )
    if not 1 <= args.batch <= 1024:
        return _unusable(f"--batch-size {args.batch} is not allowed; give 1 to 1024")
    if args.seed < 0:
        return _unusable(f"--seed {args.seed} is not allowed; give an integer >= 0")
    try:
        tokens = tokenize(args.layer)
        if len(tokens) != 1 or not USER_LAYER.fullmatch(tokens[0].name):
            return _unusable(not_a_layer)
        path, _, name = tokens[0].name.rpartition(":")
        layer = load_layer(path, name, tokens[0].args, tokens[0].kwargs)
    except LayersError:
        return _unusable(not_a_layer)
    except (UserLayerError, ValueError) as error:
        return _unusable(str(error))
    started = time.perf_counter()
    try:
        report = check_layer(layer, args.shape, batch=args.batch, seed=args.seed)
    except LayerUnusable as error:
        return _unusable(str(error))
    print(format_report(report, brief=args.brief))
    print(f"({time.perf_counter() - started:.1f} s, including JAX compilation)")
    return 0 if report.passed else EXIT_FAILED


def _unusable(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_UNUSABLE
