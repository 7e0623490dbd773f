"""A scheduler's warning signal stops spinlm at the next safe point, with everything resumable kept.

    spinlm run CONFIG.yaml     # SIGTERM, SIGUSR1 (run.preempt_signals) or Ctrl-C: stop, exit 75, re-run resumes

Clusters warn before they kill: SLURM (`sbatch --signal=B:USR1@120`, preemption), Kubernetes and
spot instances send SIGTERM, then SIGKILL after a grace period. `watch(cfg.run)` (the CLI wraps
every command that runs stages in it, in every process) records the first such signal; the loops
ask `agreed()` at their safe points and raise `errors.Preempted` (exit code 75): training once the
optimizer step in progress is done, after a checkpoint at that step
(spinlm.training.guards.stop_if_preempted); generation and scoring between batches (their finished
rows are kept already); the loop between stages (spinlm.rundir.Stage).

Under several processes a signal may reach one process only: `agreed()` is a collective (the
largest signal number over the processes), so every process stops at the same point, and a sharded
checkpoint is written by all of them. Each process must call it at the same points; it costs one
all-reduce of one number per optimizer step (docs/preemption.md has the measurement).

A second signal, or run.preempt_grace_s after the first, exits at once (os._exit(75)), after the
cleanups registered with `at_exit` (stop a managed generation server, release the run lock): what
a kill -9 leaves is resumable too. A repeat within DUPLICATE_S counts as the same notice delivered
twice: torchrun forwards the signals it gets to its workers, which may have had them directly too
(Ctrl-C in a terminal signals the whole process group; SLURM signals every process of a step).
Once stopped, a process on its way out ignores them (`on_the_way_out`), so its exit code stays 75.

The signals are read by a thread, from the interpreter's wakeup fd, not by a Python handler: a
handler runs only when the main thread runs Python code, which a process waiting in a collective
does not, and the second signal must work there too.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from spinlm.errors import Preempted, TrainingStopped

log = logging.getLogger("spinlm")

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again
DUPLICATE_S = 2.0
# Signals a scheduler may warn with; SIGKILL and SIGSTOP cannot be caught, the others mean faults.
CATCHABLE = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU", "SIGINT")

_state: dict = {"signal": None, "at": 0.0, "timer": None, "numbers": set(), "fd": -1, "grace_s": 0.0}
_cleanups: dict[int, Callable[[], None]] = {}


def requested() -> str | None:
    """The first signal this process got inside `watch` (its name), or None. Local: under several
    processes, stop only where `agreed()` says so, or the others wait for this one in their next
    collective."""
    return _state["signal"]


def agreed() -> str | None:
    """The first signal of any process (the largest signal number among them), or None. A collective
    under several processes: every process calls it at the same point, and all get the same answer."""
    from spinlm import dist

    mine = _state["signal"]
    if dist.world() == 1:
        return mine
    import torch
    import torch.distributed as torch_dist

    number = torch.tensor([int(signal.Signals[mine]) if mine else 0], device=dist.state().device)
    torch_dist.all_reduce(number, op=torch_dist.ReduceOp.MAX)  # NCCL reduces device tensors only
    return signal.Signals(int(number.item())).name if int(number.item()) else None


def stop_here(where: str) -> None:
    """Raise Preempted at this safe point if any process was signalled (`agreed()`: a collective)."""
    from spinlm.errors import Preempted

    name = agreed()
    if name:
        raise Preempted(f"{name}: stopped {where}")


def at_exit(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run `cleanup` before an exit at once (a second signal, the grace period); returns the call
    that unregisters it. Kept short: it runs in the listening thread, the main thread still running."""
    key = id(cleanup)
    _cleanups[key] = cleanup
    return lambda: _cleanups.pop(key, None)


@contextmanager
def watch(run_cfg) -> Iterator[None]:
    """While inside: run.preempt_signals and SIGINT request a stop (see the module docstring). An
    error after a signal comes out as Preempted (it was most likely caused by the signal: a vLLM
    engine or a server of the process group, or another rank, got it too), but for a training guard's.
    Outside the main thread (a command run by a thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = {int(signal.Signals[name]) for name in [*run_cfg.preempt_signals, "SIGINT"]}
    read, write = os.pipe()
    os.set_blocking(write, False)  # the interpreter's C handler writes here, and must never block
    grace_s = float(run_cfg.preempt_grace_s)
    _state.update(signal=None, at=0.0, timer=None, numbers=numbers, fd=write, grace_s=grace_s)
    previous = {n: signal.signal(n, _handler) for n in numbers}
    old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    listener = threading.Thread(target=_listen, args=(read, numbers, grace_s), name="spinlm-preempt", daemon=True)
    listener.start()
    try:
        yield
    except (Preempted, TrainingStopped):
        raise
    except Exception as e:
        if _state["signal"] is None:
            raise
        raise Preempted(f"{_state['signal']}: stopped; an error followed, most likely caused by the signal (a child "
                        f"process or another rank got it too): {e}") from e
    finally:
        signal.set_wakeup_fd(old_fd)
        for number, handler in previous.items():
            signal.signal(number, handler)
        os.close(write)  # the listener reads end-of-file and returns
        listener.join(timeout=5)
        if _state["timer"] is not None:
            _state["timer"].cancel()
        _state["signal"] = None  # outside a watch no loop stops on it


def on_the_way_out() -> None:
    """For a process leaving after a stop, everything kept (the CLI calls it before it returns 75):
    the watched signals are ignored from now on. torchrun signals the other workers as soon as one
    has exited, and the interpreter's shutdown (seconds, with a process group to take down) must
    not turn that into a death by SIGTERM, exit code -15: the interpreter resets a Python handler to
    the default action as it shuts down, but leaves "ignore" in place. SIGKILL still ends it."""
    if threading.current_thread() is threading.main_thread():
        for number in _state["numbers"]:
            signal.signal(number, signal.SIG_IGN)


def _handler(signum, frame) -> None:
    """The Python-level handler: installing it makes the interpreter write the signal number to the
    wakeup fd, which `_listen` reads in its own thread. Only if a library has put another fd in its
    place (asyncio does, for its own handlers) is the signal noted here instead."""
    ours = _state["fd"]
    current = signal.set_wakeup_fd(ours, warn_on_full_buffer=False)
    if current != ours:
        signal.set_wakeup_fd(current)  # that library's, as it was
        _note(signal.Signals(signum).name, _state["grace_s"])


def _listen(read: int, numbers: set[int], grace_s: float) -> None:
    try:
        while chunk := os.read(read, 64):
            for number in chunk:
                if number in numbers:  # the fd also carries signals other libraries handle
                    _note(signal.Signals(number).name, grace_s)
    finally:
        os.close(read)


def _who() -> str:
    return f"rank {os.environ.get('RANK', '?')}: " if os.environ.get("WORLD_SIZE", "1") != "1" else ""


def _note(name: str, grace_s: float) -> None:
    now = time.monotonic()
    if _state["signal"] is None:
        _state.update(signal=name, at=now)
        log.warning("%sreceived %s: stopping at the next safe point (training: when the optimizer step in progress "
                    "is done, with a checkpoint at it; generation and scoring: after the rows in progress); a second "
                    "signal exits at once", _who(), name)
        if grace_s > 0:
            timer = threading.Timer(grace_s, _exit_now, args=(f"run.preempt_grace_s={grace_s:g} s ran out",))
            timer.daemon = True
            _state["timer"] = timer
            timer.start()
    elif now - _state["at"] < DUPLICATE_S:
        log.info("%s%s again within %g s: taken as the same notice delivered twice (torchrun forwards what its "
                 "workers may have got directly); one after that exits at once", _who(), name, DUPLICATE_S)
    else:
        _exit_now(f"a second signal ({name})")


def _exit_now(why: str) -> None:
    """Run the cleanups and exit with EXIT_CODE."""
    log.warning("%s%s: exiting at once (exit code %d); a re-run resumes from the last checkpoint and the rows "
                "finished so far", _who(), why, EXIT_CODE)
    for cleanup in list(_cleanups.values()):
        try:
            cleanup()
        except Exception:  # nothing may keep this process from exiting
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)
