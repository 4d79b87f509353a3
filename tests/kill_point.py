"""`train.py` that SIGKILLs itself at a chosen point: the child process of the soak test.

Usage: `TBHVAE_KILL_POINT='{"phase": "save", "occurrence": 2, "delay": 0.004}' python tests/kill_point.py
<train.py flags>`. When the `occurrence`-th call (1-based, counted in this process) of the
phase's function begins, a timer sends SIGKILL `delay` seconds later, so that the kill lands
inside the phase or just after it, at a point no hook chooses. Phases:

- "train": `TrainingMonitor.on_train_begin` (the kill lands among the training steps),
- "save": `TrainingMonitor.save` (inside TensorFlow's checkpoint write, or around it),
- "periodic_evaluation": `TrainingMonitor.evaluate`,
- "final_evaluation": `tbhvae.train.loop.final_evaluation` (the evaluation, or writing metrics.json).
Without the variable it is train.py.
"""
import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tbhvae.cli.train as cli  # noqa: E402  (after the path: run from any directory)

PHASES = ("train", "save", "periodic_evaluation", "final_evaluation")


def _kill_later(delay: float) -> None:
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


def _armed(function, occurrence: int, delay: float):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == occurrence:
            _kill_later(delay)
        return function(*args, **kwargs)

    return wrapper


def install(plan: dict) -> None:
    """Arms the kill of `plan` ({"phase", "occurrence", "delay"}); imports TensorFlow."""
    from tbhvae.train import loop, monitor

    phase, occurrence, delay = plan["phase"], int(plan["occurrence"]), float(plan["delay"])
    if phase not in PHASES:
        raise SystemExit(f"kill_point: unknown phase {phase!r}; one of {', '.join(PHASES)}")
    if phase == "final_evaluation":
        loop.final_evaluation = _armed(loop.final_evaluation, occurrence, delay)
    else:
        name = {"train": "on_train_begin", "save": "save", "periodic_evaluation": "evaluate"}[phase]
        setattr(monitor.TrainingMonitor, name, _armed(getattr(monitor.TrainingMonitor, name), occurrence, delay))


def main() -> None:
    plan = os.environ.get("TBHVAE_KILL_POINT")
    if plan:
        start = cli.start_tensorflow

        def start_then_arm():  # TensorFlow starts as in train.py, then the kill is armed
            start()
            install(json.loads(plan))

        cli.start_tensorflow = start_then_arm
    sys.argv[0] = "train.py"
    cli.run()


if __name__ == "__main__":
    main()
