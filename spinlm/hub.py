"""The Hugging Face Hub, through huggingface_hub and its cache (HF_HOME), online or offline (HF_HUB_OFFLINE=1).

- A dataset id, subset (config) and split become the split's data files (`dataset_split`): the dataset card's
  YAML `configs:` block maps each subset's splits to file patterns (`data_files`); a card without one is read
  the way `datasets` reads it (shards named `data/{split}-00000-of-00001*.parquet`, else file or folder names
  holding train / validation / test, else every file is `train`). Only the split's files are downloaded, and
  spinlm's own readers (spinlm.data) read them, so a bad row is named by file and row. `datasets.load_dataset`
  is not used: offline it reads only its own prepared cache, not the Hub files huggingface_hub keeps.
- A model id and revision become the commit they resolve to (`model_commit`, recorded with every run) and the
  model's size without its weights (`model_weights`): the safetensors headers the Hub serves
  (`get_safetensors_metadata`), else the cached files' headers, else an estimate from config.json.

A missing id, revision, subset or split is a UserError naming what exists (offline: what the cache holds).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from spinlm.errors import UserError

log = logging.getLogger("spinlm")

READABLE = (".parquet", ".jsonl", ".json")  # what spinlm.data reads
# file types `datasets` would take as data; others (README.md, .gitattributes, scripts) are never data
_DATA_SUFFIXES = READABLE + (".csv", ".tsv", ".txt", ".arrow", ".jsonl.gz", ".json.gz", ".csv.gz", ".zip", ".tar",
                             ".webdataset", ".lance", ".xml", ".h5", ".hdf5", ".avro", ".orc")
# datasets' names for the three default splits, when a card has no configs block (datasets/data_files.py)
_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                   "test": ("test", "testing", "eval", "evaluation")}
_SHARDED = re.compile(r"^data/(?P<split>[^/]+?)-\d{5}-of-\d{5}[^/]*\.[^/]+$")
_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_hub_id(name: str) -> bool:
    """`ORG/NAME` (or `NAME`) that is not a local path."""
    return (bool(_ID.match(name)) and not Path(name).expanduser().exists()
            and not name.startswith((".", "/", "~")) and ".." not in name)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_dir(repo_id: str, repo_type: str) -> Path:
    return _cache() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _cached_ids(repo_type: str) -> list[str]:
    prefix = f"{repo_type}s--"
    found = _cache().glob(f"{prefix}*") if _cache().is_dir() else []
    return sorted(p.name[len(prefix):].replace("--", "/", 1) for p in found if (p / "snapshots").is_dir())


def _cached_revisions(repo_id: str, repo_type: str) -> list[str]:
    """`main (commit)` for each ref, then the commits no ref names."""
    repo = _repo_dir(repo_id, repo_type)
    refs = {p.name: p.read_text().strip() for p in (repo / "refs").glob("*") if p.is_file()}
    named = [f"{ref} ({sha})" for ref, sha in sorted(refs.items())]
    snapshots = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    return named + [s for s in snapshots if s not in refs.values()]


def _hub_error(e: Exception, repo_id: str, repo_type: str, revision: str | None) -> UserError:
    """What went wrong resolving `repo_id` at `revision`, and what exists instead."""
    from huggingface_hub import errors

    kind = "dataset" if repo_type == "dataset" else "model"
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(e, errors.HFValidationError):
        return UserError(f"{repo_id}: not a local file or directory, and not a valid Hub {kind} id (ORG/NAME): {e}")
    if isinstance(e, errors.GatedRepoError):
        return UserError(f"{repo_id}: the Hub {kind} is gated: accept its terms on huggingface.co and set HF_TOKEN")
    if isinstance(e, errors.RepositoryNotFoundError):
        return UserError(f"{repo_id}: no such Hub {kind} (or it is private: set HF_TOKEN to a token that can read "
                         "it); a local path must exist")
    if isinstance(e, errors.RevisionNotFoundError):
        return UserError(f"{repo_id}: revision {revision!r} does not exist on the Hub; it has "
                         f"{_remote_refs(repo_id, repo_type)}")
    if isinstance(e, errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE=1" if _offline() else "the Hub could not be reached"
        if not (_repo_dir(repo_id, repo_type) / "snapshots").is_dir():
            cached = ", ".join(_cached_ids(repo_type)) or "none"
            return UserError(f"{repo_id}: not a local path, and the Hub {kind} is not in the Hugging Face cache "
                             f"{_cache()} ({why}); cached {kind}s: {cached}")
        return UserError(f"{repo_id}: revision {revision or 'main'!r} is not in the Hugging Face cache {_cache()} "
                         f"({why}); cached revisions: {', '.join(_cached_revisions(repo_id, repo_type)) or 'none'}")
    if isinstance(e, errors.EntryNotFoundError):
        return UserError(f"{repo_id}{at}: {e}")
    return UserError(f"{repo_id}{at}: could not be read from the Hugging Face Hub: {type(e).__name__}: {e}")


def _remote_refs(repo_id: str, repo_type: str) -> str:
    try:
        from huggingface_hub import HfApi

        refs = HfApi().list_repo_refs(repo_id, repo_type=repo_type)
    except Exception:  # only to help the message
        return "branches and tags that could not be listed"
    names = [f"branch {b.name}" for b in refs.branches] + [f"tag {t.name}" for t in refs.tags]
    return ", ".join(names) or "no branches"


# ---------------------------------------------------------------- datasets


@dataclass
class SplitFiles:
    """A split of a Hub dataset at one commit: its files, in the order they are read."""

    repo_id: str
    commit: str
    subset: str
    split: str
    files: list[tuple[str, Path]]  # (path in the repository, local path)


def dataset_split(repo_id: str, split: str, subset: str | None = None, revision: str | None = None) -> SplitFiles:
    """Resolve a Hub dataset's split to local files (downloading only them, into the cache)."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=["README.md"]))
    except Exception as e:
        raise _hub_error(e, repo_id, "dataset", revision) from None
    commit = root.name
    names = _repo_files(repo_id, commit, root)
    configs = _card_configs(root / "README.md", repo_id)
    subset, splits = _subset_splits(repo_id, configs, subset, names)
    if split not in splits:
        raise UserError(f"{repo_id}: no split {split!r} in subset {subset!r} (revision {commit[:12]}); it has "
                        f"{', '.join(sorted(splits)) or 'no data files'}")
    files = splits[split]
    if not files:
        raise UserError(f"{repo_id}: split {split!r} of subset {subset!r} matches no file (revision {commit[:12]})")
    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", revision=commit, allow_patterns=files))
    except Exception as e:
        raise _hub_error(e, repo_id, "dataset", commit) from None
    return SplitFiles(repo_id, commit, subset, split, [(f, root / f) for f in files])


def _repo_files(repo_id: str, commit: str, root: Path) -> list[str]:
    """Every file of the commit: the Hub's listing online; offline, what the cache holds of it."""
    if not _offline():
        try:
            from huggingface_hub import HfApi

            return sorted(HfApi().list_repo_files(repo_id, repo_type="dataset", revision=commit))
        except Exception as e:
            log.warning("%s: could not list the files of revision %s on the Hub (%s); using the cached ones",
                        repo_id, commit[:12], e)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _card_configs(readme: Path, repo_id: str) -> list[dict] | None:
    """The dataset card's YAML `configs:` list, or None where the card has none."""
    import yaml

    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        raise UserError(f"{repo_id}: README.md: the dataset card's YAML header does not parse: {e}") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if configs is None:
        return None
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise UserError(f"{repo_id}: README.md: `configs` must be a list of mappings with config_name and data_files")
    return configs


def _subset_splits(repo_id: str, configs: list[dict] | None, subset: str | None,
                   names: list[str]) -> tuple[str, dict[str, list[str]]]:
    """(subset name, split -> files) for the chosen subset (None: the card's default)."""
    data = [n for n in names if n.endswith(_DATA_SUFFIXES) and not any(p.startswith((".", "__"))
                                                                       for p in n.split("/"))]
    if configs is None:
        if subset not in (None, "default"):
            raise UserError(f"{repo_id}: no subset {subset!r}; the dataset card defines no subsets (configs), so "
                            "it has one: 'default'")
        return "default", _default_splits(data)
    by_name = {str(c.get("config_name", "default")): c for c in configs}
    if subset is None:
        marked = [n for n, c in by_name.items() if c.get("default")]
        subset = marked[0] if marked else "default" if "default" in by_name else (
            next(iter(by_name)) if len(by_name) == 1 else None)
        if subset is None:
            raise UserError(f"{repo_id}: the dataset has subsets {', '.join(by_name)} and none is the default: "
                            "choose one (data.train_subset, data.val_subset, data.eval_subset)")
    if subset not in by_name:
        raise UserError(f"{repo_id}: no subset {subset!r}; it has {', '.join(by_name)}")
    config = by_name[subset]
    patterns = _split_patterns(config.get("data_files"), config.get("data_dir"))
    if patterns is None:
        return subset, _default_splits([n for n in data if n.startswith(config.get("data_dir", "").rstrip("/") + "/")]
                                       if config.get("data_dir") else data)
    return subset, {s: [n for n in names if any(_glob(p).match(n) for p in ps)] for s, ps in patterns.items()}


def _split_patterns(data_files, data_dir: str | None) -> dict[str, list[str]] | None:
    """A config's data_files as split -> patterns (the three forms a card may use: one pattern, a list of
    patterns, or a list of {split, path}); None where there is none."""
    if data_files is None:
        return None
    if isinstance(data_files, str):
        out = {"train": [data_files]}
    elif isinstance(data_files, dict):
        out = {str(s): [p] if isinstance(p, str) else list(p) for s, p in data_files.items()}
    elif all(isinstance(x, str) for x in data_files):
        out = {"train": list(data_files)}
    else:
        out = {}
        for x in data_files:
            path = x.get("path", []) if isinstance(x, dict) else x
            out.setdefault(str(x.get("split", "train")) if isinstance(x, dict) else "train", []).extend(
                [path] if isinstance(path, str) else list(path))
    prefix = data_dir.strip("/") + "/" if data_dir else ""
    return {s: [prefix + p.lstrip("/") for p in ps] for s, ps in out.items()}


def _default_splits(data: list[str]) -> dict[str, list[str]]:
    """Splits of a dataset whose card names none, as `datasets` finds them."""
    sharded: dict[str, list[str]] = {}
    for n in data:
        if m := _SHARDED.match(n):
            sharded.setdefault(m.group("split"), []).append(n)
    if sharded:
        return sharded
    found: dict[str, list[str]] = {}
    for split, words in _SPLIT_KEYWORDS.items():
        word = re.compile(rf"(^|[-._ 0-9/])({'|'.join(words)})([-._ 0-9/]|$)")
        hits = [n for n in data if word.search(n.rsplit(".", 1)[0] + "/")]
        if hits:
            found[split] = hits
    return found or ({"train": data} if data else {})


def _glob(pattern: str) -> re.Pattern:
    """A data_files pattern as fsspec reads it: `*` within one folder, `**` across folders."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[" and (j := pattern.find("]", i)) > i:
            out, i = out + pattern[i:j + 1], j + 1
            continue
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


# ---------------------------------------------------------------- models


def model_commit(name: str, revision: str | None) -> str | None:
    """The commit a Hub model id resolves to at `revision` (None for a local directory); a UserError for an
    unknown id or revision, naming what exists."""
    if not is_hub_id(name):
        return None
    return _config_path(name, revision).parent.name


def model_key(path: str, revision: str | None) -> str:
    """A model's identity in a fingerprint: a Hub id with its revision (a changed revision is another model)."""
    return f"{path}@{revision}" if revision and is_hub_id(path) else path


def _config_path(name: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json", revision=revision))
    except Exception as e:
        raise _hub_error(e, name, "model", revision) from None


def snapshot_dir(name: str, revision: str | None) -> str:
    """A local directory holding the Hub model at `revision` (for a program that takes a path but no revision,
    e.g. a generation server's command): config, tokenizer and safetensors files only."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return snapshot_download(name, revision=revision, allow_patterns=patterns,
                                 ignore_patterns=["consolidated*", "original/*"])
    except Exception as e:
        raise _hub_error(e, name, "model", revision) from None


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def model_weights(name: str, revision: str | None) -> dict:
    """Parameters and weight bytes of a Hub model without downloading its weights, and where they came from:
    the Hub's safetensors metadata (online), the cached safetensors files' headers, or an estimate from the
    (cached) config.json."""
    config_path = _config_path(name, revision)
    commit = config_path.parent.name
    if not _offline():
        try:
            from huggingface_hub import get_safetensors_metadata

            meta = get_safetensors_metadata(name, revision=commit)
            counts = meta.parameter_count
            return {"parameters": sum(counts.values()), "source": "the Hub's safetensors metadata",
                    "weights_bytes": sum(n * _DTYPE_BYTES.get(d, 2) for d, n in counts.items()), "commit": commit}
        except Exception as e:  # not a safetensors repo, or the Hub unreachable: fall back
            log.info("%s: no safetensors metadata from the Hub (%s); sizing from the cache or config.json", name, e)
    cached = _cached_safetensors(config_path.parent)
    if cached:
        return {**cached, "source": "the cached safetensors headers", "commit": commit}
    return {**_estimate(config_path), "source": "an estimate from config.json (no safetensors metadata: offline "
                                                "and the weights not cached)", "commit": commit}


def _cached_safetensors(snapshot: Path) -> dict | None:
    """Counts from the headers of a snapshot's safetensors files, where all of them are cached."""
    import json

    from safetensors import safe_open

    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (snapshot / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        return None
    if not all((snapshot / f).exists() for f in files):
        return None
    params = nbytes = 0
    for f in files:
        with safe_open(str(snapshot / f), "pt") as st:
            for key in st.keys():
                sl = st.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                params += n
                nbytes += n * _DTYPE_BYTES.get(sl.get_dtype(), 2)
    return {"parameters": params, "weights_bytes": nbytes}


def _estimate(config_path: Path) -> dict:
    """Parameters of a decoder-only transformer from its config.json (embeddings, attention with grouped KV heads,
    a gated MLP, norms; an untied output layer), weights at the config's dtype."""
    import json

    c = json.loads(config_path.read_text())
    c = c.get("text_config", c)
    try:
        h, layers, heads, vocab = (int(c[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "vocab_size"))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{config_path}: config.json lacks hidden_size, num_hidden_layers, num_attention_heads or "
                        "vocab_size, and there is no safetensors metadata to size the model from") from None
    head_dim = int(c.get("head_dim") or h // heads)
    kv = int(c.get("num_key_value_heads") or heads) * head_dim
    inter = int(c.get("intermediate_size") or 4 * h)
    attention = h * heads * head_dim * 2 + h * kv * 2 + (heads * head_dim + 2 * kv) * bool(
        c.get("attention_bias") or c.get("model_type") == "qwen2")
    per_layer = attention + 3 * h * inter + 2 * h
    params = vocab * h * (1 if c.get("tie_word_embeddings") else 2) + layers * per_layer + h
    dtype = str(c.get("torch_dtype") or c.get("dtype") or "float32")
    per = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 2)
    return {"parameters": params, "weights_bytes": params * per}
