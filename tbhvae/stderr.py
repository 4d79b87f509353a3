"""Dropping known noise that TensorFlow and LiteRT's C++ code print to the process's stderr."""
import contextlib
import os
import re
import sys
import tempfile


@contextlib.contextmanager
def stderr_without(noise: re.Pattern):
    """Captures what the process writes to stderr (fd 2, C++ code included) meanwhile and
    passes on every line that does not match `noise` when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not noise.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


# the TFLite converter's quantiser prints its settings; LiteRT announces its default CPU delegate
TFLITE_NOISE = re.compile(r"^fully_quantize: \d|Created TensorFlow Lite XNNPACK delegate for CPU")
