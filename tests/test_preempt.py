"""Preemption with real signals (spinlm.preempt): real `spinlm` processes, signalled while they work.

- `spinlm run` (SFT, then a SPIN iteration) gets SIGTERM during SFT, SIGUSR1 and then Ctrl-C (SIGINT)
  during SPIN training: each attempt exits 75 with a checkpoint at the optimizer step in progress,
  nothing marked done; the re-runs resume from there (the logged steps of all attempts together are
  each step once: none redone) and end with an uninterrupted run's weights bit for bit
  (run.deterministic, CPU);
- the same under `torchrun --nproc_per_node 2` with train.strategy fsdp: first rank 1 alone gets
  SIGTERM (the processes agree, both write their shards of the checkpoint at the same step), then
  torchrun gets it and forwards it to both;
- `spinlm generate` through a managed server: SIGTERM keeps the finished rows, stops the server
  (no process of its group left), and the re-run asks the server only for the other rows; a second
  signal exits at once, killing the server (a repeat within DUPLICATE_S does not); so does
  run.preempt_grace_s running out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from spinlm import config, preempt
from spinlm.cli import main
from spinlm.errors import UserError

SPINLM = [sys.executable, "-m", "spinlm"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spinlm"]
SFT_STEP = re.compile(r"sft step (\d+)/\d+  loss")
TRAIN_STEP = re.compile(r"^\d\d:\d\d:\d\d step (\d+)/\d+  loss", re.M)
STOPPED = re.compile(r"spinlm: preempted \(exit code 75\): (\w+): (.+) stopped after optimizer step (\d+) of \d+; "
                     r"checkpoint (\S+) written")


class Launched:
    """A real spinlm process; its output (stdout and stderr together) is read line by line as it comes."""

    def __init__(self, argv: list[str]):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env.pop("SPINLM_FAULT", None)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_until(self, found, what: str, timeout: float = 300):
        """found(output so far), once it is true (checked at each new line)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (result := found(self.text)):
                assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.text[-3000:]}"
                assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.text[-3000:]}"
                self.changed.wait(0.5)
        return result

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first output line matching `pattern`, once it is printed."""
        return self.wait_until(re.compile(pattern, re.M).search, repr(pattern), timeout)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.1)  # the reader's last lines
        return code


def _run_config(path: Path, tiny_model: Path, task_data: dict, run_dir: Path, sharded: bool) -> Path:
    """Many short steps (one pair per process each), so that a signal lands mid-training; periodic
    checkpoints every 8 steps, which a signal must not fall back to."""
    cfg = {
        "run": {"dir": str(run_dir), "progress": False, "seed": 5, "deterministic": True, "log_every": 1},
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(task_data["train"]), "max_train_rows": 24, "val_size": 0 if sharded else 4,
                 "max_prompt_length": 64, "max_length": 128},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "spin": {"iterations": 1, "mix_window": 1, "beta": 0.1},
        "sft": {"enabled": not sharded, "epochs": 5, "batch_size": 1, "learning_rate": 1e-3, "eval_every": 5},
        "train": {"learning_rate": 1e-3, "epochs": 5 if sharded else 8, "batch_size": 1, "checkpoint_every": 8,
                  "strategy": "fsdp" if sharded else "ddp"},
        "eval": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(pattern: re.Pattern, text: str) -> list[int]:
    return [int(s) for s in pattern.findall(text)]


def _interrupt(launcher: list[str], cfg: Path, after: re.Pattern, at_least: int, send) -> tuple[Launched, re.Match]:
    """Start `spinlm run cfg`, call send(launched) once step `at_least` of `after` is logged; the
    attempt must exit 75 (for torchrun: its workers) with a checkpoint at the step in progress."""
    attempt = Launched([*launcher, "run", str(cfg)])
    attempt.wait_until(lambda text: at_least in _steps(after, text), f"step {at_least}")
    send(attempt)
    code = attempt.finish()
    stopped = STOPPED.search(attempt.text)
    assert stopped, attempt.text[-3000:]
    if launcher is SPINLM:
        assert code == 75, (code, attempt.text[-3000:])
    ckpt = Path(stopped[4])
    step = int(stopped[3])
    assert ckpt.name == f"step-{step:06d}" and (ckpt / "complete").exists()
    assert [p.name for p in ckpt.parent.glob("step-*")] == [ckpt.name]  # the periodic one (8, 16, ...) is replaced
    assert _steps(after, attempt.text)[-1] == step, "the step in progress is done and saved; no later one started"
    assert not (Path(yaml.safe_load(cfg.read_text())["run"]["dir"]) / ".lock").exists(), "the run lock is released"
    return attempt, stopped


@pytest.mark.slow
def test_signalled_run_resumes_bit_identical_with_no_step_redone(tiny_model, task_data, tmp_path):
    ref = Launched([*SPINLM, "run", str(_run_config(tmp_path / "ref.yaml", tiny_model, task_data, tmp_path / "ref",
                                                     sharded=False))])
    assert ref.finish() == 0, ref.text[-3000:]
    run = tmp_path / "run"
    cfg = _run_config(tmp_path / "cfg.yaml", tiny_model, task_data, run, sharded=False)

    first, stop1 = _interrupt(SPINLM, cfg, SFT_STEP, 3, lambda a: a.proc.send_signal(signal.SIGTERM))
    assert stop1[1] == "SIGTERM" and stop1[2] == "sft" and not list(run.rglob("*.done"))
    second, stop2 = _interrupt(SPINLM, cfg, TRAIN_STEP, 3, lambda a: a.proc.send_signal(signal.SIGUSR1))
    assert stop2[1] == "SIGUSR1" and stop2[2] == "iteration 0's training"
    assert f"resumed training from {stop1[4]} (optimizer step {stop1[3]})" in second.text
    third, stop3 = _interrupt(SPINLM, cfg, TRAIN_STEP, int(stop2[3]) + 3, lambda a: a.proc.send_signal(signal.SIGINT))
    assert stop3[1] == "SIGINT" and not (run / "iteration-0" / "model.done").exists()
    final = Launched([*SPINLM, "run", str(cfg)])
    assert final.finish() == 0, final.text[-3000:]
    assert f"resumed training from {stop3[4]} (optimizer step {stop3[3]})" in final.text

    attempts = [first.text, second.text, third.text, final.text]
    for pattern in (SFT_STEP, TRAIN_STEP):  # every optimizer step ran once over the four attempts: none redone
        assert sorted(s for text in attempts for s in _steps(pattern, text)) == _steps(pattern, ref.text)
    for model in ("sft/model", "iteration-0/model"):
        assert _digest(run / model / "model.safetensors") == _digest(tmp_path / "ref" / model / "model.safetensors")
    resumed, straight = (json.loads((d / "sft/model/spinlm_sft.json").read_text()) for d in (run, tmp_path / "ref"))
    strip = lambda h: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in h["history"]]  # noqa: E731
    assert strip(resumed) == strip(straight) and resumed["best_heldout_nll"] == straight["best_heldout_nll"]
    assert not list(run.rglob("*.tmp*")), "scratch files are removed once the stages are done"


def _rank_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (its RANK environment variable)."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_fsdp_signal_to_one_rank_or_all_checkpoints_together(tiny_model, task_data, tmp_path):
    ref = Launched([*TORCHRUN, "run", str(_run_config(tmp_path / "ref.yaml", tiny_model, task_data, tmp_path / "ref",
                                                       sharded=True))])
    assert ref.finish() == 0, ref.text[-3000:]
    cfg = _run_config(tmp_path / "cfg.yaml", tiny_model, task_data, tmp_path / "run", sharded=True)

    first, stop1 = _interrupt(TORCHRUN, cfg, TRAIN_STEP, 3,
                              lambda a: os.kill(_rank_pid(a.proc, 1), signal.SIGTERM))
    assert first.proc.returncode == 1  # torchrun's own code; its report has each worker's
    assert set(re.findall(r"exitcode\s*: (-?\d+)", first.text)) == {"75"}, first.text[-3000:]
    assert "rank 1: received SIGTERM" in first.text and "rank 0: received" not in first.text
    ckpt = Path(stop1[4])
    assert sorted(p.name for p in ckpt.iterdir()) == ["complete", "rng-rank0.safetensors", "rng-rank1.safetensors",
                                                       "sharded", "state.json"]
    second, stop2 = _interrupt(TORCHRUN, cfg, TRAIN_STEP, int(stop1[3]) + 3,
                               lambda a: a.proc.send_signal(signal.SIGTERM))  # torchrun forwards it to both
    assert f"resumed sharded training from {ckpt}" in second.text
    assert "rank 0: received SIGTERM" in second.text and "rank 1: received SIGTERM" in second.text
    final = Launched([*TORCHRUN, "run", str(cfg)])
    assert final.finish() == 0, final.text[-3000:]
    assert f"resumed sharded training from {stop2[4]}" in final.text

    texts = [first.text, second.text, final.text]
    assert sorted(s for text in texts for s in _steps(TRAIN_STEP, text)) == _steps(TRAIN_STEP, ref.text)
    model = "iteration-0/model/model.safetensors"
    assert _digest(tmp_path / "run" / model) == _digest(tmp_path / "ref" / model)


# ---------------------------------------------------------------- generation through a managed server

SERVER = '''
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, delay, requests = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with open(requests, "a") as f:
            f.write("request\\n")
        time.sleep(delay)
        data = json.dumps({"choices": [{"text": "hi", "finish_reason": "stop"}],
                           "usage": {"completion_tokens": 2}}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''
ROWS = 8


def _generate(tiny_model: Path, tmp_path: Path, delay_s: float, *extra: str) -> Launched:
    """`spinlm generate` of ROWS prompts through a managed server answering each request after
    `delay_s`, one request at a time; the server counts the requests in tmp_path/requests."""
    (tmp_path / "serve.py").write_text(SERVER)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"id": "r{i}", "prompt": "What is {i} plus 3?", "response": "{i + 3}"}}\n'
                            for i in range(ROWS)))
    command = (f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'serve.py'))} {{port}} {delay_s} "
               f"{shlex.quote(str(tmp_path / 'requests'))} # {{model}}")
    return Launched([*SPINLM, "generate", "--model", str(tiny_model), "--data", str(data), "--out",
                     str(tmp_path / "gen.jsonl"), "--run.progress=false", "--generation.backend=server",
                     f"--generation.server_command={command}", "--generation.concurrency=1", *extra])


def _live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` still running (a zombie holds no port and no memory; one whose
    parent exited at once waits for init to reap it)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, ...
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _server_gone(launched: Launched) -> None:
    """Neither the server nor anything it started is left running, and its port is closed."""
    ready = launched.wait_for(r"generation server ready at http://127.0.0.1:(\d+) \(pid (\d+)\)")
    deadline = time.monotonic() + 5  # SIGKILL is delivered at once, but not synchronously
    while _live_in_group(int(ready[2])):
        assert time.monotonic() < deadline, f"server processes left: {_live_in_group(int(ready[2]))}"
        time.sleep(0.05)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(ready[1]))) != 0


def _rows(partial: Path) -> int:
    return len(partial.read_text().splitlines()) - 1 if partial.exists() else 0  # line 1: the fingerprint


def test_signal_during_generation_keeps_rows_and_stops_the_server(tiny_model, tmp_path):
    partial = tmp_path / "gen.jsonl.tmp.partial"
    first = _generate(tiny_model, tmp_path, 0.4)
    first.wait_for("sending")
    deadline = time.monotonic() + 60
    while _rows(partial) < 2:
        assert time.monotonic() < deadline and first.proc.poll() is None, first.text[-3000:]
        time.sleep(0.05)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75, first.text[-3000:]
    _server_gone(first)
    kept = _rows(partial)
    assert 2 <= kept < ROWS and not (tmp_path / "gen.jsonl").exists()
    assert f"generate: {kept} of {ROWS} rows are finished and kept in {partial}: a re-run generates only the others" \
        in first.text

    (tmp_path / "requests").unlink()
    second = _generate(tiny_model, tmp_path, 0.0)
    assert second.finish() == 0, second.text[-3000:]
    assert len((tmp_path / "requests").read_text().splitlines()) == ROWS - kept  # only the rows not kept
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == ROWS


def test_second_signal_exits_at_once_and_kills_the_server(tiny_model, tmp_path):
    """The server takes 60 s per answer, so the first signal's safe point (the answer in flight) is
    far; a repeat within DUPLICATE_S is taken as the same notice, one after that exits at once."""
    launched = _generate(tiny_model, tmp_path, 60.0)
    launched.wait_for("sending")
    first = time.monotonic()
    launched.proc.send_signal(signal.SIGTERM)
    launched.wait_for("received SIGTERM")
    launched.proc.send_signal(signal.SIGTERM)  # as torchrun forwards what its workers got already
    time.sleep(1.0)
    assert launched.proc.poll() is None, "a repeat within DUPLICATE_S is the same notice"
    time.sleep(max(0.0, first + preempt.DUPLICATE_S + 0.5 - time.monotonic()))
    second = time.monotonic()
    launched.proc.send_signal(signal.SIGTERM)
    assert launched.finish(timeout=30) == 75
    assert time.monotonic() - second < 5, "exits at once, not after the answer in flight"
    assert "a second signal (SIGTERM): exiting at once" in launched.text
    _server_gone(launched)
    assert not (tmp_path / "gen.jsonl").exists() and _rows(tmp_path / "gen.jsonl.tmp.partial") == 0


def test_grace_period_running_out_exits_at_once(tiny_model, tmp_path):
    launched = _generate(tiny_model, tmp_path, 60.0, "--run.preempt_grace_s=2")
    launched.wait_for("sending")
    start = time.monotonic()
    launched.proc.send_signal(signal.SIGUSR1)
    assert launched.finish(timeout=30) == 75
    assert 2 <= time.monotonic() - start < 10
    assert "run.preempt_grace_s=2 s ran out: exiting at once" in launched.text
    _server_gone(launched)


# ---------------------------------------------------------------- settings and the handlers themselves


def test_preempt_settings_are_validated(tiny_model, task_data, capsys):
    cfg = config.build(None, ["--run.preempt_signals=[SIGTERM,SIGKILL,TERM]", "--run.preempt_grace_s=-1"])
    with pytest.raises(UserError) as e:
        config.validate(cfg, need=())
    text = str(e.value)
    assert "'SIGKILL' is not a signal spinlm can stop on" in text and "'TERM' is not" in text
    assert "valid: SIGTERM, SIGUSR1, SIGUSR2, SIGHUP, SIGQUIT, SIGXCPU, SIGINT" in text
    assert "run.preempt_grace_s must be >= 0" in text
    code = main(["generate", "--model", str(tiny_model), "--data", str(task_data["train"]), "--out", "unused.jsonl",
                 "--run.preempt_signals=[SIGSTOP]"])
    assert code == 2 and "'SIGSTOP' is not a signal spinlm can stop on" in capsys.readouterr().err


def test_watch_takes_a_real_signal_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    cfg = config.build(None, ["--run.preempt_signals=[SIGUSR2]"])
    with preempt.watch(cfg.run):
        assert preempt.requested() is None and preempt.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while preempt.requested() is None:  # read by the listening thread
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert preempt.requested() == preempt.agreed() == "SIGUSR2"
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM], "not in run.preempt_signals here"
    assert {s: signal.getsignal(s) for s in before} == before
    assert preempt.requested() is None  # outside a watch no loop stops on it


def test_an_error_after_a_signal_is_a_preemption_but_a_guards_stop_is_not():
    """An engine or a server of the process group dies of the same signal: the run is resumable, exit 75."""
    from spinlm.errors import Preempted, TrainingStopped

    cfg = config.build(None, ["--run.preempt_signals=[SIGUSR2]"])
    with pytest.raises(RuntimeError):  # before any signal: the error as it is
        with preempt.watch(cfg.run):
            raise RuntimeError("engine core died")
    for error, expected in ((RuntimeError("engine core died"), Preempted), (TrainingStopped("loss is nan"),
                                                                               TrainingStopped)):
        with pytest.raises(expected) as caught:
            with preempt.watch(cfg.run):
                os.kill(os.getpid(), signal.SIGUSR2)
                while preempt.requested() is None:
                    time.sleep(0.01)
                raise error
        assert caught.value is error or (caught.value.__cause__ is error and "SIGUSR2: stopped; an error followed"
                                         in str(caught.value))


def test_a_signal_is_noted_when_a_library_took_the_wakeup_fd():
    """asyncio puts its own fd in the interpreter's wakeup slot: the handler then notes the signal itself."""
    cfg = config.build(None, ["--run.preempt_signals=[SIGUSR2]"])
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        with preempt.watch(cfg.run):
            ours = signal.set_wakeup_fd(write)  # as a library would
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while preempt.requested() is None:  # the main thread's handler runs between these bytecodes
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert signal.set_wakeup_fd(ours) == write, "the library's fd is left in place"
            assert os.read(read, 8) == bytes([signal.SIGUSR2])
    finally:
        os.close(read)
        os.close(write)
