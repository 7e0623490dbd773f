"""Model cards: a README.md in every model directory of a run (sft/model, iteration-t/model).

Written by `spinlm report RUN`, by `spinlm push`, and by `spinlm run` (at its end, and before each
push with run.push_to_hub). A card is built with huggingface_hub's ModelCard, so the Hub reads its
front matter: library_name, pipeline_tag, tags, base_model (when the run started from a Hub id),
datasets (the Hub ids among the run's data), license (carried from the base model's own card when
one is on this machine: its directory, or the Hugging Face cache), and a model-index with the
model's held-out (test) and validation metrics. The body says what the model is, where its data
came from, its training numbers, its held-out metrics and the config sections that produced it.
The run is read by spinlm.report.runs.load_run.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from spinlm import __version__
from spinlm.report.runs import finite, load_run
from spinlm.rundir import CONTINUED_SFT, SFT, RunLayout, iteration_of

TAGS = ["spinlm", "spin", "self-play", "self-play-fine-tuning"]
LICENSE_KEYS = ("license", "license_name", "license_link")  # license: other comes with a name and a link
METRIC_NAMES = {"nll_per_token": "NLL per token of the real responses", "accuracy": "Task accuracy (greedy)",
                "reward_accuracy": "Reward accuracy", "reward_margin": "Reward margin",
                "dead_pair_share": "Share of dead pairs (generated = real)",
                "greedy_mean_tokens": "Mean greedy response length (tokens)",
                "greedy_hit_max_new_tokens": "Share of greedy responses cut at max_new_tokens",
                "rewards_real": "Mean reward of the real responses",
                "rewards_generated": "Mean reward of the generated responses"}
PAPER = ("[SPIN](https://arxiv.org/abs/2401.01335) (Chen et al., *Self-Play Fine-Tuning Converts Weak Language "
         "Models to Strong Language Models*, ICML 2024)")
SECTIONS = {"sft": ("model", "data", "sft", "peft", "eval"),
            "iteration": ("model", "data", "generation", "spin", "train", "packing", "peft", "eval")}


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub id (org/name, not a local path), else None."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def _start(run: dict, t: int) -> str:
    """The model iteration t started from (and used as reference): p_t."""
    if t > 0:
        return str(RunLayout(run["dir"]).iteration(t - 1) / "model")
    sft = run["models"][0]
    return str(sft["model"]) if sft["name"] == SFT and sft["model"] else run["config"]["model"]["name_or_path"]


def _about(run: dict, m: dict) -> list[str]:
    cfg, data = run["config"], run["config"].get("data", {})
    train = f"`{data.get('train')}`" + (f" (first {data['max_train_rows']} rows)" if data.get("max_train_rows") else "")
    lines = [f"- Prompts and real responses: {train}", f"- Held-out data for the metrics below: `{data.get('eval')}`"]
    if m["name"] == "sft":
        return [f"Supervised fine-tuning of `{cfg['model']['name_or_path']}` on the real responses, the start "
                f"model of a {PAPER} run made with spinlm {__version__}.", "", "## Data", "", *lines]
    if m["name"] == CONTINUED_SFT:
        steps = (m["train"] or {}).get("steps")
        return [f"The baseline of a {PAPER} run made with spinlm {__version__}: the run's start model "
                f"`{_start(run, 0)}` fine-tuned further on the real responses (continued SFT) for {steps} optimizer "
                "steps, as many as all SPIN iterations took together, selected on validation as the iterations "
                "are (checked at their check steps, the best checked weights kept).", "", "## Data", "", *lines]
    t = int(m["name"].rsplit("-", 1)[1])
    window = range(max(0, t - int(cfg.get("spin", {}).get("mix_window", 1)) + 1), t + 1)
    return [f"Iteration {t} of {PAPER}, made with spinlm {__version__}: the model p_{t + 1}, trained from and "
            f"against the reference `{_start(run, t)}` (p_{t}) to prefer the real responses over its own samples.",
            "", "## Data", "", *lines,
            f"- Generated responses: sampled in iteration(s) {', '.join(map(str, window))} "
            f"(`iteration-s/generations.jsonl`), all scored under p_{t}"]


def _numbers(title: str, values: dict, skip: tuple[str, ...] = ()) -> list[str]:
    rows = [(k, v) for k, v in values.items() if k not in skip and isinstance(v, (int, float, str))]
    if not rows:
        return []
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["", f"## {title}", "", "| | |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows]


def base_card(name_or_path: str | None, revision: str | None = None) -> tuple[dict | None, str]:
    """The front matter of the base model's own card and where it was read, or (None, why not): its
    README.md when it is a local directory, else the cached README.md of the Hub id (never fetched:
    cards are written offline too, and the cache is what the run loaded the model from)."""
    if not name_or_path:
        return None, "the run names no base model"
    if Path(name_or_path).expanduser().is_dir():
        readme = Path(name_or_path).expanduser() / "README.md"
        if not readme.is_file():
            return None, f"the base model's directory `{name_or_path}` has no README.md"
    elif hub_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "README.md", revision=revision)
        if not isinstance(cached, str):  # None, or the cache's note that the repo has no README.md
            return None, f"the card of `{name_or_path}` is not in this machine's Hugging Face cache"
        readme = Path(cached)
    else:
        return None, f"the base model `{name_or_path}` is neither a local directory nor a Hub id"
    from huggingface_hub import metadata_load

    try:
        return metadata_load(readme) or {}, f"`{readme}`"
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        return None, f"the base model's card `{readme}` cannot be read ({e})"


def carried_license(cfg: dict) -> tuple[dict, str]:
    """license (with license_name and license_link where the base card has them) from the base
    model's card, and the card's sentence on where it came from, or why there is none."""
    model = cfg.get("model", {})
    meta, where = base_card(model.get("name_or_path"), model.get("revision"))
    found = {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), str) and meta[k]} if meta else {}
    if "license" in found:
        return found, f"`{found['license']}`, carried from the base model's card ({where})."
    why = f"the base model's card ({where}) states none" if meta is not None else where
    return {}, (f"Not stated: {why}. Check the base model's terms and add `license` to this card's front matter "
                "before sharing the model.")


def hub_datasets(cfg: dict) -> list[str]:
    """The Hub dataset ids among the run's training, validation and held-out data (files are left out)."""
    data = cfg.get("data", {})
    return list(dict.fromkeys(d for d in (hub_id(data.get(k)) for k in ("train", "val", "eval")) if d))


def _split(data: dict, which: str) -> tuple[str, str, str] | None:
    """(dataset type, dataset name, split) of the held-out ("eval") or validation ("val") data."""
    source, split = data.get(which), data.get(f"{which}_split") if hub_id(data.get(which)) else None
    if which == "eval":
        return (_name(source), f"held-out data ({_name(source)})", split or "test") if source else None
    if source:
        return _name(source), f"validation data ({_name(source)})", split or "validation"
    train = data.get("train") or "train"
    return _name(train), f"validation rows split off the training data ({_name(train)})", "validation"


def _name(source: str) -> str:
    """A dataset as the model-index names it: its Hub id, or a file's name (not its local path)."""
    return hub_id(source) or Path(source).name


def eval_results(run: dict, m: dict) -> list:
    """huggingface_hub EvalResults (the card's model-index) of every finite metric of model m on
    the held-out data (never selected on) and on the validation data (RUN/best is chosen on it)."""
    from huggingface_hub import EvalResult

    data, results = run["config"].get("data", {}), []
    for which, metrics in (("eval", m["metrics"]), ("val", m.get("val_metrics") or {})):
        dataset = _split(data, which)
        for key, value in metrics.items() if dataset else ():
            if key == "examples" or isinstance(value, bool) or not finite(value):
                continue
            results.append(EvalResult(task_type="text-generation", task_name="Text Generation",
                                      dataset_type=dataset[0], dataset_name=dataset[1], dataset_split=dataset[2],
                                      metric_type=key, metric_name=METRIC_NAMES.get(key, key),
                                      metric_value=float(value)))
    return results


def _at(value, t: int):
    """A per-iteration setting (a value, or a list with one per iteration) at iteration t."""
    return value[t] if isinstance(value, list) and t < len(value) else value


def spinlm_meta(run: dict, m: dict) -> dict:
    """The card's `spinlm` key: which model of which run, and the settings its iteration trained with."""
    cfg, t = run["config"], iteration_of(m["name"])
    meta = {"version": __version__, "run": run["dir"].name, "model": m["name"]}
    if t is not None:
        spin = cfg.get("spin", {})
        meta.update(iteration=t, objective=spin.get("objective", "spin"), beta=_at(spin.get("beta"), t),
                    learning_rate=_at(cfg.get("train", {}).get("learning_rate"), t),
                    mix_window=spin.get("mix_window"))
    return meta


def model_name(run: dict, m: dict) -> str:
    """The model-index name: the Hub repo's name (run.hub_model_id) or the run's, and the model's."""
    repo = (run["config"].get("run") or {}).get("hub_model_id") or run["dir"].name
    return f"{repo.split('/')[-1]}-{m['name']}"


def card_data(run: dict, m: dict, license: dict):
    """The card's front matter as huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    cfg, results = run["config"], eval_results(run, m)
    objective = cfg.get("spin", {}).get("objective", "spin")
    tags = TAGS + ([objective.replace("_", "-")] if m["name"] not in (SFT, CONTINUED_SFT) and objective != "spin"
                   else [])
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         base_model=hub_id(cfg.get("model", {}).get("name_or_path")),
                         datasets=hub_datasets(cfg) or None, eval_results=results or None,
                         model_name=model_name(run, m) if results else None, spinlm=spinlm_meta(run, m), **license)


def card_text(run: dict, m: dict) -> str:
    """The README.md of model m: front matter the Hub reads (checked by parsing it as a ModelCard), then the body."""
    from huggingface_hub import ModelCard

    cfg = run["config"]
    license, license_line = carried_license(cfg)
    sections = SECTIONS["sft" if m["name"] in (SFT, CONTINUED_SFT) else "iteration"]
    train = {k: v for k, v in (m["train"] or {}).items() if not isinstance(v, (list, dict))}
    final = {k: v for k, v in ((m["train"] or {}).get("final") or {}).items() if k not in ("step", "lr", "elapsed_s")}
    lines = [f"# {run['dir'].name} / {m['name']}", "", *_about(run, m), "", "## License", "", license_line]
    lines += _numbers("Training", {**train, **{f"final {k}": v for k, v in final.items()}})
    lines += _numbers("Held-out metrics", m["metrics"], skip=("model",)) or ["", "## Held-out metrics", "",
                                                                            "Not evaluated."]
    lines += _numbers("Validation metrics (what RUN/best is chosen on)", m.get("val_metrics") or {}, skip=("model",))
    config = yaml.safe_dump({s: cfg[s] for s in sections if s in cfg}, sort_keys=False).rstrip()
    lines += ["", "## Config", "", "The sections of the run's config.yaml that produced this model:", "",
              "```yaml", config, "```", ""]
    front = card_data(run, m, license).to_yaml()
    return str(ModelCard("---\n" + front + "\n---\n\n" + "\n".join(lines)))


def write_cards(run: dict) -> list[Path]:
    """README.md in every model directory of the run (from runs.load_run); returns their paths."""
    written = []
    for m in run["models"]:
        if m["model"] is None:
            continue
        path = m["model"] / "README.md"
        tmp = path.with_name("README.md.tmp")  # a card half-written by a crash is never uploaded
        tmp.write_text(card_text(run, m), encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def write_run_cards(run_dir: Path) -> None:
    """The cards of the models a run has so far (rank 0 writes; the summary need not exist yet)."""
    from spinlm import dist

    if dist.is_main():
        write_cards(load_run(run_dir, need_summary=False))
