"""Command-line entry points (absl), one module per command: train, export, baselines, extract, retrieval, serve.

The convention every command follows: a module docstring with its usage, a
`define_flags()` that `run()` calls (importing a command module defines no
flags), `main(argv)` and `run()` = `define_flags(); run_main(main, __name__)`
(the console script). Every error, bad flags included, is one `error: ...`
line on stderr and exit code 2 (`fail`).
"""
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from absl import app, flags

from tbhvae.stderr import stderr_without

# What TensorFlow prints to stderr as it starts, before its logging is set up (so
# TF_CPP_MIN_LOG_LEVEL cannot hide it), that says nothing to a user: the absl pre-init
# notice, the oneDNN notice and the CPU-instruction notes. Without a GPU (no /dev/nvidiactl)
# also the missing-CUDA lines; on a GPU machine they may be the only hint of a broken driver.
_STARTUP_NOISE = [r"All log messages before absl::InitializeLog\(\) is called", r"oneDNN custom operations are on",
                  r"rebuild TensorFlow with the appropriate compiler flags",
                  r"This TensorFlow binary is optimized to use available CPU instructions"]
_NO_GPU_NOISE = [r"Could not find cuda drivers on your machine", r"failed call to cuInit",
                 r"Unable to register cu(DNN|FFT|BLAS) factory"]


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


def start_tensorflow() -> None:
    """Imports TensorFlow and finds its devices, keeping what it prints to stderr except its start-up noise.

    Each command calls this where it first needs TensorFlow (after its cheap checks);
    every other line TensorFlow writes meanwhile, warnings and errors included, is
    passed on to stderr. A second call does nothing.
    """
    if getattr(start_tensorflow, "done", False):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's own INFO and WARNING lines after start-up
    patterns = _STARTUP_NOISE + ([] if Path("/dev/nvidiactl").exists() else _NO_GPU_NOISE)
    with stderr_without(re.compile("|".join(patterns))):
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA's probe happens here
    start_tensorflow.done = True
