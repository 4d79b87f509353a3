"""Command-line entry points (absl): `train` and `export`."""
import sys

from absl import app, flags


def fail(message: str, code: int = 2) -> None:
    """Prints a one-line error to stderr and exits with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_main(main, module_name: str) -> None:
    """app.run(main) with `module_name`'s flags listed by --help.

    absl's --help lists the flags of sys.argv[0]'s module, which is a thin
    script or a console-script launcher rather than the module defining them.
    """
    for flag in flags.FLAGS.get_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
