"""`train.py` that SIGKILLs itself at a chosen point: the child process of the soak test.

Usage: `TBHVAE_KILL_POINT='{"phase": "save", "occurrence": 2, "delay": 0.004}' python tests/kill_point.py
<train.py flags>`. When the `occurrence`-th call (1-based, counted in this process) of the
phase's function begins, a timer sends SIGKILL `delay` seconds later, so that the kill lands
inside the phase or after it, at a point no hook chooses. The kill always lands: a process that
would end before its timer waits for it (and says so on stderr, `RETURNED_EARLY`). Phases:

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tbhvae.cli.train as cli  # noqa: E402  (after the path: run from any directory)

PHASES = ("train", "save", "periodic_evaluation", "final_evaluation")
RETURNED_EARLY = "kill_point: the phase returned before its kill"
_timers: list[threading.Timer] = []


def _kill_later(delay: float) -> threading.Timer:
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()
    _timers.append(timer)
    return timer


def _report_a_pending_kill() -> None:
    if any(timer.is_alive() for timer in _timers):
        print(RETURNED_EARLY, file=sys.stderr, flush=True)


def _armed(function, occurrence: int, delay: float):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == occurrence:
            _kill_later(delay)
        return function(*args, **kwargs)

    return wrapper


def _reporting(function):
    """`function`, which ends the phase, then a word on stderr if the armed kill is still pending."""
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        _report_a_pending_kill()
        return result

    return wrapper


def _wait_for_the_kill() -> None:
    """Holds a process that is about to end until its armed kill has landed."""
    for timer in _timers:
        timer.join()
        time.sleep(60)  # SIGKILL is on its way; never reached in practice


def install(plan: dict) -> None:
    """Arms the kill of `plan` ({"phase", "occurrence", "delay"}); imports TensorFlow."""
    from tbhvae.train import loop, monitor

    phase, occurrence, delay = plan["phase"], int(plan["occurrence"]), float(plan["delay"])
    if phase not in PHASES:
        raise SystemExit(f"kill_point: unknown phase {phase!r}; one of {', '.join(PHASES)}")
    trainer = monitor.TrainingMonitor
    if phase == "final_evaluation":
        loop.final_evaluation = _reporting(_armed(loop.final_evaluation, occurrence, delay))
    elif phase == "train":  # the phase is every step, from on_train_begin to on_train_end
        trainer.on_train_begin = _armed(trainer.on_train_begin, occurrence, delay)
        trainer.on_train_end = _reporting(trainer.on_train_end)
    else:
        name = {"save": "save", "periodic_evaluation": "evaluate"}[phase]
        setattr(trainer, name, _reporting(_armed(getattr(trainer, name), occurrence, delay)))


def main() -> None:
    plan = os.environ.get("TBHVAE_KILL_POINT")
    if plan:
        start = cli.start_tensorflow

        def start_then_arm():  # TensorFlow starts as in train.py, then the kill is armed
            start()
            install(json.loads(plan))

        cli.start_tensorflow = start_then_arm
    sys.argv[0] = "train.py"
    try:
        cli.run()
    finally:
        _wait_for_the_kill()


if __name__ == "__main__":
    main()
