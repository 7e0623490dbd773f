"""Publishing a run's models on the Hugging Face Hub: each model on a branch of one repo, RUN/best on main.

    spinlm push RUN [--iteration N | --best] [--repo-id ID] [--private] [--branch B]
    run.push_to_hub: true       `spinlm run` pushes each model once it is evaluated

Every upload is planned first (`Upload`: repo, branch, model folder, the files it sends), then sent
with huggingface_hub's HfApi: create_repo, create_branch, upload_folder(revision=branch). The model
card (README.md, spinlm.report.cards) is rewritten just before. RUN/pushed.json records what each
branch of each repo holds, written only after upload_folder returned: a re-run pushes nothing twice,
and a failed upload leaves no record, so re-running the same command retries it. The token is read
from HF_TOKEN only, and never logged or written.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from spinlm import dist
from spinlm.config import Config
from spinlm.config.rules import repo_id_problem
from spinlm.errors import UserError
from spinlm.io import marker, read_json, write_json
from spinlm.report.cards import write_cards
from spinlm.report.runs import load_run
from spinlm.rundir import CONTINUED_SFT, RunLayout, acquire_lock, iteration_name, release_lock
from spinlm.summary import model_entry, select_best

log = logging.getLogger("spinlm")
MAIN = "main"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # weights that run code when loaded: never sent


@dataclass(frozen=True)
class Upload:
    """One model folder of a run to one branch of one Hub repo: exactly what push() sends."""

    repo_id: str
    branch: str
    model: str  # the run's name for it: sft, iteration-0, ...
    folder: Path  # RUN/<model>/model
    files: tuple[str, ...]  # relative to folder, sorted: upload_folder's allow_patterns
    private: bool
    trained: str | None  # when the model's stage finished (its .done marker): a retrained model is pushed again

    @property
    def key(self) -> str:
        return f"{self.repo_id}@{self.branch}"

    @property
    def message(self) -> str:
        return f"spinlm: {self.model} of run {self.folder.parent.parent.name}"


def hub_token() -> str:
    """HF_TOKEN, the one place spinlm takes a Hub token from (no flag, no file, no config key)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError("pushing to the Hugging Face Hub needs a token with write access in the environment variable "
                        "HF_TOKEN (https://huggingface.co/settings/tokens); spinlm reads it from there only")
    return token


def check_repo_id(repo_id: str, what: str = "--repo-id") -> None:
    if problem := repo_id_problem(repo_id):
        raise UserError(f"{what}: {problem}")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub call raises: HfHubHTTPError (an OSError), OfflineModeIsEnabled (a
    ConnectionError), and the HTTP library's own errors (a refused connection, a timeout), whose base
    class HfHubHTTPError shares (httpx's in huggingface_hub 1.x and later, requests' before)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    return (OSError, HFValidationError, *HfHubHTTPError.__bases__)


def _quiet_http() -> None:
    """huggingface_hub's HTTP library logs every request at INFO, which the CLI's log level shows: our own
    lines say what is pushed where."""
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def model_files(folder: Path) -> tuple[str, ...]:
    """Every file of a model folder, relative to it and sorted; hidden and temporary files are left
    out, and a pickle weight file is refused (spinlm saves safetensors only)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts) or path.name.endswith(".tmp"):
            continue
        if path.suffix in PICKLES:
            raise UserError(f"{path}: a pickle file; spinlm publishes safetensors weights only (loading a pickle runs "
                            "code): remove it from the folder")
        files.append(rel.as_posix())
    return tuple(files)


def upload_for(run_dir: Path, name: str, repo_id: str, private: bool, branch: str | None = None) -> Upload | None:
    """RUN/name/model to `branch` (default: a branch named after the model); None when the run made
    no model there (the SFT start of a run with sft.enabled false, an iteration not trained yet)."""
    folder = RunLayout(run_dir).model(name)
    if not (folder / "config.json").is_file():
        return None
    trained = (read_json(marker(folder), {}) or {}).get("finished")
    return Upload(repo_id, branch or name, name, folder, model_files(folder), private, trained)


def chosen(run_dir: Path) -> str | None:
    """The model RUN/best points to (RUN/best.json, chosen on validation at the end of `spinlm run`)."""
    return (read_json(run_dir / "best.json", {}) or {}).get("name")


def plan(run: dict, repo_id: str, private: bool, iteration: int | None = None, best: bool = False,
         branch: str | None = None) -> list[Upload]:
    """What `spinlm push` sends: one iteration's model, RUN/best's, or (neither) every model the run
    trained (SFT, each iteration; not the continued-SFT baseline) on its own branch and RUN/best's on main."""
    run_dir = run["dir"]
    if iteration is not None:
        up = upload_for(run_dir, iteration_name(iteration), repo_id, private, branch)
        if up is None:
            raise UserError(f"{RunLayout(run_dir).model(iteration_name(iteration))}: no such model (has iteration "
                            f"{iteration} finished training?)")
        return [up]
    name = chosen(run_dir)
    if best:
        if name is None:
            raise UserError(f"{run_dir / 'best.json'}: not found: the run chose no model on validation (it has not "
                            "finished, or has no validation data); push one with --iteration N")
        up = upload_for(run_dir, name, repo_id, private, branch or MAIN)
        if up is None:
            raise UserError(f"RUN/best of {run_dir} is {name}, the model the run started from, which it did not "
                            "train: nothing of this run to publish as the best model")
        return [up]
    names = [m["name"] for m in run["models"] if m["model"] is not None and m["name"] != CONTINUED_SFT]
    uploads = [upload_for(run_dir, n, repo_id, private) for n in names]
    uploads.append(upload_for(run_dir, name, repo_id, private, MAIN) if name else None)
    return [u for u in uploads if u is not None]


def is_pushed(run_dir: Path, up: Upload) -> bool:
    """RUN/pushed.json says the branch holds this model, as trained now."""
    record = (read_json(RunLayout(run_dir).pushed(), {}) or {}).get(up.key) or {}
    return record.get("model") == up.model and record.get("trained") == up.trained


def push(run_dir: Path, uploads: list[Upload], force: bool = False) -> list[dict]:
    """Send every upload that RUN/pushed.json does not record yet (all of them with force), and record
    each once upload_folder returned. Returns the new records."""
    todo = [u for u in uploads if force or not is_pushed(run_dir, u)]
    for u in uploads:
        if u not in todo:
            log.info("%s: %s holds it already (%s); not pushed again", u.model, u.key, RunLayout(run_dir).pushed())
    if not todo:
        return []
    from huggingface_hub import HfApi

    _quiet_http()
    api, records = HfApi(token=hub_token()), []
    for u in todo:
        commit = send(api, u, RunLayout(run_dir).pushed())
        records.append(record(run_dir, u, commit))
    return records


def send(api, up: Upload, record_path: Path):
    """create_repo, create_branch (not for main), then upload_folder onto the branch: up's files, and
    nothing else left there.
    A failure is a UserError saying nothing was recorded (a re-run retries)."""
    from huggingface_hub import metadata_load

    card = up.folder / "README.md"
    if not card.is_file() or not (metadata_load(card) or {}).get("license"):
        log.warning("%s: its card states no license (its License section says why): add one on the Hub", up.model)
    log.info("pushing %s (%d files) to %s, branch %s", up.folder, len(up.files), up.repo_id, up.branch)
    try:
        api.create_repo(up.repo_id, private=up.private or None, exist_ok=True)  # None: the account's default
        if up.branch != MAIN:
            api.create_branch(up.repo_id, branch=up.branch, exist_ok=True)
        # delete_patterns: the branch ends up holding exactly the folder (a new branch starts as a copy of
        # main, and main held another model before); the Hub keeps .gitattributes
        return api.upload_folder(repo_id=up.repo_id, folder_path=up.folder, revision=up.branch,
                                 allow_patterns=list(up.files), delete_patterns=["*"], commit_message=up.message)
    except _hub_errors() as e:
        raise UserError(f"pushing {up.folder} to {up.repo_id} (branch {up.branch}) failed: {_reason(e)}; nothing was "
                        f"recorded as pushed ({record_path}): re-run the same command to retry") from None


def record(run_dir: Path, up: Upload, commit) -> dict:
    """RUN/pushed.json gets up's branch: which model, as trained when, the commit, the files."""
    path = RunLayout(run_dir).pushed()
    entry = {"model": up.model, "trained": up.trained, "repo_id": up.repo_id, "branch": up.branch,
             "private": up.private, "commit": getattr(commit, "oid", None),
             "url": str(getattr(commit, "commit_url", "") or "") or None, "files": list(up.files),
             "pushed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(path, {**(read_json(path, {}) or {}), up.key: entry})
    log.info("pushed %s to %s: %s", up.model, up.key, entry["url"])
    return entry


def push_run(run_dir: Path, repo_id: str | None = None, private: bool | None = None, iteration: int | None = None,
             best: bool = False, branch: str | None = None, force: bool = False, dry_run: bool = False) -> list[dict]:
    """`spinlm push`: the run's cards rewritten, then plan() sent (under the run's lock, so never a run
    still writing). repo_id and private default to the run's run.hub_model_id and run.hub_private_repo.
    dry_run: the cards and the plan only (what would be sent, as records with "dry_run"); no token, no network,
    nothing recorded as pushed."""
    run = load_run(run_dir, need_summary=False)
    settings = run["config"].get("run") or {}
    repo_id = repo_id or settings.get("hub_model_id")
    if not repo_id:
        raise UserError("spinlm push: which repo? pass --repo-id NAME or ORG/NAME (or set run.hub_model_id in the "
                        "run's config)")
    check_repo_id(repo_id)
    if branch and iteration is None and not best:
        raise UserError("spinlm push: --branch names the branch of one model: use it with --iteration N or --best")
    private = bool(settings.get("hub_private_repo", False)) if private is None else private
    lock = acquire_lock(Path(run_dir))
    try:
        write_cards(run)
        uploads = plan(run, repo_id, private, iteration, best, branch)
        if dry_run:
            return [{"model": u.model, "repo_id": u.repo_id, "branch": u.branch, "private": u.private,
                     "files": list(u.files), "card": str(u.folder / "README.md"), "dry_run": True}
                    for u in uploads if force or not is_pushed(Path(run_dir), u)]
        return push(Path(run_dir), uploads, force)
    finally:
        release_lock(lock)


def check_access(cfg: Config) -> None:
    """Before a run that pushes (run.push_to_hub): HF_TOKEN is set and the Hub accepts it (one whoami
    call), so a missing token or an unreachable Hub stops the run before hours of training, not after."""
    def ask() -> None:
        from huggingface_hub import HfApi

        _quiet_http()
        try:
            user = HfApi(token=hub_token()).whoami()
        except _hub_errors() as e:
            raise UserError(f"run.push_to_hub: the Hugging Face Hub cannot be reached or refused HF_TOKEN "
                            f"({_reason(e)}); fix that, or set run.push_to_hub false and push afterwards with "
                            "`spinlm push RUN`") from None
        log.info("run.push_to_hub: models go to %s as %s", cfg.run.hub_model_id, user.get("name", "?"))

    dist.on_main(ask)


def push_evaluated(run_dir: Path, cfg: Config, name: str) -> None:
    """`spinlm run` with run.push_to_hub, once model `name` (sft, iteration-T) is evaluated: the cards,
    then its own branch, and main when the model chosen on validation so far changed (SFT and the
    iterations up to this one, chosen as summary.select_best chooses RUN/best at the end)."""
    if not cfg.run.push_to_hub:
        return

    def send_on_main() -> None:
        repo, private = cfg.run.hub_model_id, cfg.run.hub_private_repo
        write_cards(load_run(run_dir, need_summary=False))
        uploads = [upload_for(run_dir, name, repo, private)]
        names = RunLayout(run_dir).names(cfg.spin.iterations)
        best = select_best([model_entry(run_dir, n, cfg.model.name_or_path) for n in names[:names.index(name) + 1]])
        if best:
            uploads.append(upload_for(run_dir, best["name"], repo, private, MAIN))
            if uploads[-1] is None:
                log.info("main not updated: the model chosen on validation so far is the start model, not trained "
                         "by this run")
        push(run_dir, [u for u in uploads if u is not None])

    dist.on_main(send_on_main)
