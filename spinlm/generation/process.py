"""A managed generation server: the subprocess spinlm starts, waits for and stops (`generation.server_command`).

`managed_server()` starts the command for the model being generated with (`{model}` and `{port}`
filled in, split like a shell would, no shell run) on a free loopback port, in a process group
of its own, waits for `GET /health`, yields, and stops the server again (SIGTERM to its process
group, SIGKILL after a grace period), also when generation fails or is interrupted; a preemption
signal while it starts stops the wait (spinlm.preempt), and an exit at once kills it first. The
server's output goes to a log file whose last lines (after its last few error lines) are shown if
it dies before becoming healthy, or added to any UserError raised while it serves; the log is
deleted after a clean run and kept after a failure.

The generation server backend (spinlm.generation.server) uses it; the tests and benchmarks use
`free_port()` and `stop_process_group()` for the servers they start themselves.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spinlm import preempt
from spinlm.errors import Preempted, UserError
from spinlm.generation.client import opener

log = logging.getLogger("spinlm")

STOP_GRACE_S = 15.0  # SIGTERM -> SIGKILL
LOG_TAIL_LINES = 20


def free_port() -> int:
    """A loopback port free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(command: str, model_path: str, port: int) -> list[str]:
    """The command split like a shell would (no shell runs), placeholders filled per argument."""
    return [a.replace("{model}", model_path).replace("{port}", str(port)) for a in shlex.split(command)]


@contextmanager
def managed_server(command: str, model_path: str, start_timeout_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server, yield (its base URL, its process) once healthy, stop it
    on the way out (errors included). A UserError raised while it serves comes out with the server's
    state and the last lines of its log added.

    The log is deleted after a clean run and kept (its path logged) after a failure.
    """
    port = free_port()
    args = server_args(command, model_path, port)
    url = f"http://127.0.0.1:{port}"
    log_dir = Path(tempfile.mkdtemp(prefix="spinlm-server-"))
    log_path = log_dir / "server.log"
    log.info("starting the generation server: %s (log: %s)", shlex.join(args), log_path)
    with open(log_path, "wb") as log_file:
        try:
            # A session of its own: Ctrl-C does not reach it directly, and its workers stop with it.
            proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as e:
            shutil.rmtree(log_dir, ignore_errors=True)
            raise UserError(f"generation.server_command: cannot start {args[0]!r}: {e}") from None
        forget = preempt.at_exit(lambda: _signal_group(proc, signal.SIGKILL))  # nothing of it outlives spinlm
        try:
            _wait_healthy(proc, url, start_timeout_s, log_path)
            log.info("generation server ready at %s (pid %d)", url, proc.pid)
            try:
                yield url, proc
            except UserError as e:
                state = (f"the generation server is still running (pid {proc.pid})" if proc.poll() is None else
                         f"the generation server exited with code {proc.returncode}")
                raise UserError(f"{e}\n{state}; the last lines of its log ({log_path}):\n{_tail(log_path)}") from e
        except BaseException:
            log.info("generation server log kept at %s", log_path)
            raise
        finally:
            stop_process_group(proc)
            forget()
    shutil.rmtree(log_dir, ignore_errors=True)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if preempt.requested():  # a large model loads for minutes: longer than a scheduler's grace period
            raise Preempted(f"{preempt.requested()}: stopped while the generation server was starting")
        if proc.poll() is not None:
            raise UserError(f"the generation server exited with code {proc.returncode} before becoming healthy at "
                            f"{url}/health; the last lines of its log ({log_path}):\n{_tail(log_path)}")
        if _healthy(url):
            return
        if time.monotonic() > deadline:
            raise UserError(f"the generation server did not answer {url}/health within {timeout_s:g} s "
                            "(generation.server_start_timeout_s); the last lines of its log "
                            f"({log_path}):\n{_tail(log_path)}")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with opener(url).open(url + "/health", timeout=5) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


_ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception)\b: ")


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's last lines, after its last few distinct error lines where those came earlier (a
    server may print pages of shutdown noise after the error that stopped it)."""
    all_lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    tail = all_lines[-lines:]
    errors = list(dict.fromkeys(line.strip() for line in all_lines[:-lines] if _ERROR_LINE.search(line)))[-3:]
    shown = (["(errors earlier in the log:)", *errors, "(the log's last lines:)"] if errors else []) + tail
    return "\n".join(shown) or "(empty)"


def stop_process_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever is left after `grace_s`."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("the generation server (pid %d) did not stop within %g s: killing it", proc.pid, grace_s)
    _signal_group(proc, signal.SIGKILL)  # also any worker processes the server left behind
    proc.wait()
    # Its workers (transformers serve >= 5.25 starts multiprocessing ones) are not our children: they
    # go once their new parent reaps them. Wait for the group to be empty, so that nothing of the
    # server (a worker holding GPU memory, say) outlives the stage; give up after `grace_s`.
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    log.warning("processes of the generation server's group (pgid %d) are still there after %g s", proc.pid, grace_s)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group id is the pid: start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass
