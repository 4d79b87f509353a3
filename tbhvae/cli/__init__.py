"""Command-line entry points (absl), one module per command: train, export, baselines, extract, retrieval.

The convention every command follows: a module docstring with its usage, a
`define_flags()` that `run()` calls (importing a command module defines no
flags), `main(argv)` and `run()` = `define_flags(); run_main(main, __name__)`
(the console script). Every error, bad flags included, is one `error: ...`
line on stderr and exit code 2 (`fail`).
"""
import sys
from typing import NoReturn

from absl import app, flags


def fail(message: str, code: int = 2) -> NoReturn:
    """Prints a one-line error to stderr and exits with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def expect_no_arguments(argv: list[str]) -> None:
    """fail() when the command line holds more than --flags (argv[0] is the program)."""
    if len(argv) > 1:
        fail(f"unexpected arguments {' '.join(argv[1:])}; use --flag=value")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad or missing flag reported through `fail`."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(" ".join(str(err).split()).rstrip(".") + "; see --help")


def run_main(main, module_name: str) -> None:
    """app.run(main) with `module_name`'s flags listed by --help and flag errors through `fail`.

    absl's --help lists the flags and the docstring of sys.argv[0]'s module, which is a thin
    script or a console-script launcher rather than the module defining them.
    """
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    launcher = sys.modules["__main__"]
    if not launcher.__doc__:  # a console-script launcher: --help shows the command's own description
        launcher.__doc__ = sys.modules[module_name].__doc__
    app.run(main, flags_parser=_parse_flags)
