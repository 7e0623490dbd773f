"""Publishing on the Hub: the model cards as huggingface_hub reads them back, the upload plan, RUN/pushed.json
(no second push), and the failures (no token, no network, a refusal) that must leave nothing marked pushed.

No Hub is reachable here: the uploads go to `stand_in_hub`, a loopback server answering the endpoints that
huggingface_hub's whoami, create_repo, create_branch and upload_folder call (whoami-v2, repos/create, branch,
tree, validate-yaml, preupload, commit). It keeps what it is sent, so the tests read the files and branches
that huggingface_hub's own client sent; it is not the Hub, and the real upload ran nowhere in testing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from spinlm.cli import main
from spinlm.errors import UserError
from spinlm.io import read_json
from spinlm.report.cards import card_text
from spinlm.report.publish import MAIN, plan
from spinlm.report.runs import finite, load_run

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_spinlmTestTokenNeverPrinted0123456789"
BASE_CARD = "---\nlicense: apache-2.0\nlanguage: en\n---\n\n# A tiny base model\n"


@pytest.fixture(scope="module")
def run_dir(tiny_model, task_data, tmp_path_factory) -> Path:
    """A tiny run (SFT, one iteration, validation data so RUN/best is chosen) from a local base model
    whose own card states a license."""
    tmp = tmp_path_factory.mktemp("publish")
    base = tmp / "base"
    shutil.copytree(tiny_model, base)
    (base / "README.md").write_text(BASE_CARD)
    cfg = {
        "run": {"dir": str(tmp / "run"), "progress": False, "seed": 5},
        "model": {"name_or_path": str(base)},
        "data": {"train": str(task_data["train"]), "val": str(task_data["val"]), "eval": str(task_data["test"]),
                 "max_train_rows": 16, "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 96},
        "sft": {"enabled": True, "epochs": 1, "learning_rate": 1e-3, "batch_size": 8},
        "generation": {"max_new_tokens": 8, "batch_size": 16},
        "spin": {"iterations": 1, "mix_window": 1, "beta": 0.1},
        "train": {"learning_rate": 1e-4, "epochs": 1, "batch_size": 8},
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 8},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "cfg.yaml")]) == 0
    assert (tmp / "run" / "best.json").exists()
    return tmp / "run"


def copy_run(run_dir: Path, where: Path) -> Path:
    """A copy of the run (RUN/best's relative link kept), its config.yaml naming the new place."""
    out = where / "run"
    shutil.copytree(run_dir, out, symlinks=True)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["run"]["dir"] = str(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def spinlm(args: list[str], endpoint: str | None, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """`python -m spinlm ARGS` against `endpoint` (HF_ENDPOINT; offline mode off), HF_TOKEN = token."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return subprocess.run([sys.executable, "-m", "spinlm", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


@contextmanager
def stand_in_hub(refuse: str | None = None):
    """Loopback stand-in for the Hub's upload endpoints (see the module docstring). It keeps each branch's
    files as its commits leave them: state["trees"][(repo, branch)] = {path: bytes} (a new repo's main holds
    .gitattributes, a new branch starts as a copy of main). state["requests"]: (method, path, headers with
    lower-case names, body); state["commits"]: {repo, branch, summary, files, deleted}; state["yaml"]: the
    cards sent to validate-yaml. `refuse`: requests whose path contains it get 403."""
    state = {"requests": [], "commits": [], "yaml": [], "trees": {}}
    trees, lock = state["trees"], threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = urllib.parse.unquote(self.path.split("?")[0])
            with lock:
                state["requests"].append(("GET", path, {k.lower(): v for k, v in self.headers.items()}, b""))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
            if path == "/api/whoami-v2":
                return self.answer(200, {"type": "user", "name": "tester", "auth": {"type": "access_token"}})
            if m and (m[1], m[2]) in trees:
                return self.answer(200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                         for p, b in sorted(trees[m[1], m[2]].items())])
            # the model info the Hub serves (huggingface_hub < 1.0's upload_folder asks it whether the repo uses Xet)
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
            if info and (info[1], info[2]) in trees:
                return self.answer(200, {"id": info[1], "modelId": info[1], "private": False, "xetEnabled": False,
                                         "siblings": [{"rfilename": p} for p in sorted(trees[info[1], info[2]])]})
            self.answer(404, {"error": f"not served here: {path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urllib.parse.unquote(self.path.split("?")[0])
            with lock:
                state["requests"].append(("POST", path, {k.lower(): v for k, v in self.headers.items()}, body))
                if refuse and refuse in path:
                    return self.answer(403, {"error": "scripted refusal"})
                return self.answer(*self.post(path, body))

        def post(self, path: str, body: bytes) -> tuple[int, dict]:
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}"
                if (repo, MAIN) in trees:
                    return 409, {"error": "You already created this model repo", "url": f"{base}/{repo}"}  # as the Hub
                trees[repo, MAIN] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                return 200, {"url": f"{base}/{repo}"}
            if path == "/api/validate-yaml":
                state["yaml"].append(json.loads(body)["content"])
                return 200, {}
            if not m or (m[1], MAIN) not in trees:
                return 404, {"error": f"not served here: {path}"}
            repo, what, branch = m[1], m[2], m[3]
            if what == "branch":
                if (repo, branch) in trees:
                    return 409, {"error": "Reference already exists"}
                trees[repo, branch] = dict(trees[repo, MAIN])
                return 200, {}
            if what == "preupload":
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in json.loads(body)["files"]]}
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in items if i["key"] == "file"}
            deleted = [i["value"]["path"] for i in items if i["key"] == "deletedFile"]
            tree = trees[repo, branch]
            for gone in deleted:
                tree.pop(gone)
            tree.update(files)
            oid = hashlib.sha1(body).hexdigest()
            state["commits"].append({"repo": repo, "branch": branch, "files": files, "deleted": deleted,
                                     "summary": next(i["value"]["summary"] for i in items if i["key"] == "header")})
            return 200, {"commitUrl": f"{base}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, state
    finally:
        server.shutdown()
        server.server_close()


def branch_files(hub: dict, repo: str, branch: str) -> dict[str, bytes]:
    """What a branch of the stand-in holds, less the .gitattributes every repo starts with."""
    return {p: b for p, b in hub["trees"][repo, branch].items() if p != ".gitattributes"}


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the cards


def test_cards_are_read_back_by_huggingface_hub(run_dir):
    from huggingface_hub import ModelCard, metadata_load

    summary = {e["name"]: e for e in read_json(run_dir / "summary.json")}
    for name in ("sft", "iteration-0"):
        path = run_dir / name / "model" / "README.md"
        card = ModelCard.load(path)
        assert card.data.license == "apache-2.0"  # carried from the base model's own card
        assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
        assert {"spin", "self-play", "spinlm"} <= set(card.data.tags)
        assert card.data.base_model is None and card.data.datasets is None  # a local model and local files
        got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
        want = {("test", k): v for k, v in summary[name]["metrics"].items() if k != "examples" and finite(v)}
        want |= {("validation", k): v for k, v in summary[name]["val_metrics"].items()
                 if k != "examples" and finite(v)}
        assert got == pytest.approx(want) and ("test", "nll_per_token") in got and ("validation", "accuracy") in got
        meta = metadata_load(path)
        assert meta["model-index"][0]["name"] == f"run-{name}"
        assert {r["dataset"]["type"] for r in meta["model-index"][0]["results"]} == {"test.jsonl", "val.jsonl"}
        assert "carried from the base model's card" in card.text and "## Validation metrics" in card.text
    meta = metadata_load(run_dir / "iteration-0" / "model" / "README.md")
    assert meta["spinlm"]["iteration"] == 0 and meta["spinlm"]["beta"] == 0.1
    assert meta["spinlm"]["learning_rate"] == 1e-4 and meta["spinlm"]["objective"] == "spin"


def test_card_of_a_hub_base_model_takes_its_license_from_the_cache(run_dir, tmp_path, monkeypatch):
    """A Hub id: base_model set, the license read from the cached card (never fetched); Hub dataset
    ids listed; without a card on this machine the license is left out and the card says why."""
    import huggingface_hub.constants
    from huggingface_hub import ModelCard

    import offline_hub

    cache = tmp_path / "hub"
    offline_hub.add_model_dir(cache, "spinlm-tests/tiny-base", "a" * 40, run_dir.parent / "base")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    run = load_run(run_dir)
    run["config"]["model"]["name_or_path"] = "spinlm-tests/tiny-base"
    run["config"]["data"]["train"] = offline_hub.ULTRACHAT
    card = ModelCard(card_text(run, run["models"][1]))
    assert card.data.base_model == "spinlm-tests/tiny-base"
    assert card.data.license == "apache-2.0" and str(cache) in card.text
    assert card.data.datasets == [offline_hub.ULTRACHAT]

    run["config"]["model"]["name_or_path"] = "spinlm-tests/not-cached"
    card = ModelCard(card_text(run, run["models"][1]))
    assert card.data.license is None and "is not in this machine's Hugging Face cache" in card.text
    bare = tmp_path / "bare"
    bare.mkdir()
    run["config"]["model"]["name_or_path"] = str(bare)
    card = ModelCard(card_text(run, run["models"][1]))
    assert card.data.license is None and card.data.base_model is None and "has no README.md" in card.text


# ---------------------------------------------------------------- the plan


def test_upload_plan(run_dir, tmp_path):
    run_copy = copy_run(run_dir, tmp_path)
    (run_copy / "iteration-0" / "model" / "README.md.tmp").write_text("a card being written")
    run = load_run(run_copy)
    best = read_json(run_copy / "best.json")["name"]
    uploads = plan(run, "me/spin-tiny", private=True)
    assert [(u.model, u.branch) for u in uploads] == [("sft", "sft"), ("iteration-0", "iteration-0"), (best, MAIN)]
    for u in uploads:
        assert u.repo_id == "me/spin-tiny" and u.private and u.folder == run_copy / u.model / "model"
        expected = sorted(p for p in model_files(u.folder) if not p.endswith(".tmp"))
        assert list(u.files) == expected and {"README.md", "config.json", "model.safetensors"} <= set(u.files)
    one = plan(run, "me/spin-tiny", False, iteration=0, branch="try-1")
    assert [(u.model, u.branch, u.private) for u in one] == [("iteration-0", "try-1", False)]
    assert [(u.model, u.branch) for u in plan(run, "me/spin-tiny", False, best=True)] == [(best, MAIN)]
    with pytest.raises(UserError, match="iteration-3/model: no such model"):
        plan(run, "me/spin-tiny", False, iteration=3)
    (run_copy / "sft" / "model" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pytorch_model.bin: a pickle file"):
        plan(run, "me/spin-tiny", False)


def test_push_config_keys_are_checked(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "data": {"train": "y.jsonl"}}))
    assert main(["validate", str(cfg), "--run.push_to_hub=true"]) == 2
    assert "run.push_to_hub needs run.hub_model_id" in capsys.readouterr().err
    assert main(["validate", str(cfg), "--run.hub_model_id=me/bad..name"]) == 2
    assert "run.hub_model_id: 'me/bad..name' is not a Hub repo id" in capsys.readouterr().err


# ---------------------------------------------------------------- uploads (to the loopback stand-in)


def test_push_sends_each_model_to_its_branch_and_never_twice(run_dir, tmp_path):
    run_copy = copy_run(run_dir, tmp_path)
    best = read_json(run_copy / "best.json")["name"]
    with stand_in_hub() as (url, hub):
        p = spinlm(["push", str(run_copy), "--repo-id", "me/spin-tiny", "--private"], url)
        assert p.returncode == 0, p.stderr
        creates = [json.loads(r[3]) for r in hub["requests"] if r[1] == "/api/repos/create"]
        private = [c.get("visibility") == "private" or c.get("private") is True for c in creates]  # 1.x+, 0.x
        assert creates and all(c["name"] == "spin-tiny" and c["organization"] == "me" for c in creates) and all(private)
        branches = {r[1] for r in hub["requests"] if "/branch/" in r[1]}
        assert branches == {"/api/models/me/spin-tiny/branch/sft", "/api/models/me/spin-tiny/branch/iteration-0"}
        assert all(r[2].get("authorization") == f"Bearer {TOKEN}" for r in hub["requests"] if r[0] == "POST")
        assert [(c["repo"], c["branch"]) for c in hub["commits"]] == [
            ("me/spin-tiny", "sft"), ("me/spin-tiny", "iteration-0"), ("me/spin-tiny", MAIN)]
        for c in hub["commits"]:
            name = best if c["branch"] == MAIN else c["branch"]
            assert c["files"] == model_files(run_copy / name / "model")  # every file, byte for byte
            assert branch_files(hub, "me/spin-tiny", c["branch"]) == c["files"]  # and nothing else
            assert name in c["summary"]
        assert (run_copy / "iteration-0" / "model" / "README.md").read_text() in hub["yaml"]
        pushed = read_json(run_copy / "pushed.json")
        assert {k: v["model"] for k, v in pushed.items()} == {
            "me/spin-tiny@sft": "sft", "me/spin-tiny@iteration-0": "iteration-0", f"me/spin-tiny@{MAIN}": best}
        assert pushed["me/spin-tiny@sft"]["url"].startswith(f"{url}/me/spin-tiny/commit/")
        for text in (p.stdout, p.stderr, (run_copy / "pushed.json").read_text()):
            assert TOKEN not in text

        seen = len(hub["requests"])
        again = spinlm(["push", str(run_copy), "--repo-id", "me/spin-tiny"], url)
        assert again.returncode == 0, again.stderr
        assert "nothing to push" in again.stdout and len(hub["requests"]) == seen  # not even a connection

        forced = spinlm(["push", str(run_copy), "--repo-id", "me/spin-tiny", "--iteration", "0", "--branch", "redo",
                         "--force"], url)
        assert forced.returncode == 0, forced.stderr
        assert [c["branch"] for c in hub["commits"]] == ["sft", "iteration-0", MAIN, "redo"]
        assert read_json(run_copy / "pushed.json")["me/spin-tiny@redo"]["model"] == "iteration-0"


def test_run_pushes_as_it_goes_and_a_rerun_pushes_nothing(run_dir, tmp_path):
    """`spinlm run` with run.push_to_hub (here resuming the finished run: every stage is done, so
    the pushes are all that happens)."""
    run_copy = copy_run(run_dir, tmp_path)
    flags = ["--run.push_to_hub=true", "--run.hub_model_id=me/spin-run"]
    with stand_in_hub() as (url, hub):
        p = spinlm(["run", str(run_copy / "config.yaml"), *flags], url)
        assert p.returncode == 0, p.stderr
        branches = [c["branch"] for c in hub["commits"]]
        assert branches[:2] == ["sft", MAIN]  # after SFT's evaluation it is the best so far
        assert set(branches) == {"sft", "iteration-0", MAIN}
        pushed, best = read_json(run_copy / "pushed.json"), read_json(run_copy / "best.json")["name"]
        assert pushed[f"me/spin-run@{MAIN}"]["model"] == best
        for branch, name in (("sft", "sft"), ("iteration-0", "iteration-0"), (MAIN, best)):
            # exactly the model's files: iteration-0's branch started as a copy of main, which held SFT's
            assert branch_files(hub, "me/spin-run", branch) == model_files(run_copy / name / "model"), branch
        assert TOKEN not in p.stderr + p.stdout + (run_copy / "log.txt").read_text()

        seen = len(hub["requests"])
        again = spinlm(["run", str(run_copy / "config.yaml"), *flags], url)
        assert again.returncode == 0, again.stderr
        later = hub["requests"][seen:]  # (huggingface_hub 2.x also GETs /api/agent-harnesses, without the token)
        assert "/api/whoami-v2" in [r[1] for r in later] and [r[1] for r in later if r[0] == "POST"] == []


def test_failures_are_clear_and_mark_nothing_pushed(run_dir, tmp_path):
    run_copy = copy_run(run_dir, tmp_path)

    def no_traceback(p):
        assert p.returncode == 2 and "Traceback" not in p.stderr and TOKEN not in p.stderr + p.stdout, p.stderr
        assert not (run_copy / "pushed.json").exists()
        return p.stderr

    err = no_traceback(spinlm(["push", str(run_copy), "--repo-id", "me/x"], closed_port()))
    assert "spinlm: error: pushing" in err and "failed:" in err and "nothing was recorded as pushed" in err
    err = no_traceback(spinlm(["push", str(run_copy), "--repo-id", "me/x"], closed_port(), token=None))
    assert "needs a token with write access in the environment variable HF_TOKEN" in err
    err = no_traceback(spinlm(["run", str(run_copy / "config.yaml"), "--run.push_to_hub=true",
                               "--run.hub_model_id=me/x"], closed_port()))
    assert "run.push_to_hub: the Hugging Face Hub cannot be reached or refused HF_TOKEN" in err
    with stand_in_hub(refuse="/commit/") as (url, hub):
        err = no_traceback(spinlm(["push", str(run_copy), "--repo-id", "me/x", "--iteration", "0"], url))
        assert "403" in err and "branch iteration-0" in err and "re-run the same command to retry" in err
        assert any("/preupload/iteration-0" in r[1] for r in hub["requests"])  # it got as far as the upload


def test_dry_run_writes_the_cards_and_prints_the_plan_without_a_token_or_a_connection(run_dir, tmp_path):
    """`spinlm push --dry-run` (README's own-model page): no HF_TOKEN, a Hub endpoint that answers nothing
    (the stand-in must get no request), the cards written, each upload printed, nothing recorded."""
    run_copy = copy_run(run_dir, tmp_path)
    best = read_json(run_copy / "best.json")["name"]
    with stand_in_hub() as (url, hub):
        p = spinlm(["push", str(run_copy), "--repo-id", "me/spin-dry", "--dry-run"], url, token=None)
        assert p.returncode == 0, p.stderr
        assert hub["requests"] == []
    lines = [line for line in p.stdout.splitlines() if line.startswith("would push")]
    assert [re.search(r", branch (\S+?):", line)[1] for line in lines] == ["sft", "iteration-0", MAIN]
    assert lines[-1].startswith(f"would push {best} to me/spin-dry")
    for name in ("sft", "iteration-0"):
        files = model_files(run_copy / name / "model")
        assert f"{len(files)} files" in next(line for line in lines if f"branch {name}" in line)
    assert not (run_copy / "pushed.json").exists()
