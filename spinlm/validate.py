"""Everything that can be checked before any training: `spinlm validate CONFIG.yaml`.

`spinlm run` performs the same checks first. Checked: the config values; the model
(directory, safetensors weights, config) and its tokenizer and chat template; every data
row of every split (format, fields, types, UTF-8, empty texts, duplicates); token lengths
against the limits, with what the length policy will do; the task checker; a generation
server's reachability (backend server); the packages of run.report_to's trackers; the
disk space the planned models and checkpoints need; the memory per device (spinlm.memory), refused
when it does not fit the GPU. Any problem is a UserError (exit code 2).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from spinlm import hub
from spinlm.config import Config
from spinlm.data import Example, load_examples, split_validation
from spinlm.errors import UserError
from spinlm.generation import backend_for
from spinlm.modeling import check_local, load_tokenizer
from spinlm.rundir import RunLayout
from spinlm.tokens import Encoding, encode_prompt, encode_response
from spinlm.tracking import require as require_trackers
from spinlm.training.lora import require_peft

log = logging.getLogger("spinlm")


@dataclass
class Checked:
    train: list[Example]
    val: list[Example]
    held: list[Example]
    splits: dict[str, dict] = field(default_factory=dict)  # per split: rows and token-length statistics
    model: dict = field(default_factory=dict)  # parameters, weight bytes (local models)
    plan: list[dict] = field(default_factory=list)  # estimated tokens per iteration
    disk: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # per-device estimate (spinlm.memory)
    provenance: dict = field(default_factory=dict)  # the model's and Hub datasets' commits (RUN/run_info.json)


def model_weights(path: str, revision: str | None = None) -> dict:
    """Parameter count and bytes of a model's safetensors: a local model's from its files' headers; a Hub
    model's without downloading its weights (spinlm.hub.model_weights says how)."""
    from safetensors import safe_open

    check_local(path)
    p = Path(path)
    if not p.is_dir():
        return hub.model_weights(path, revision)

    params = 0
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    n = 1
                    for d in st.get_slice(name).get_shape():
                        n *= d
                    params += n
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"{f}: not a readable safetensors file: {e}") from None
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: no config.json in the model directory")
    return {"parameters": params, "weights_bytes": sum(f.stat().st_size for f in p.glob("*.safetensors")),
            "source": "the safetensors headers"}


def apply_length_policy(examples: list[Example], tokenizer, cfg: Config, name: str) -> tuple[list[Example], dict]:
    """Drop (or keep, for truncation) prompts over max_prompt_length; count cut responses.
    Returns the kept examples and the split's token statistics."""
    d, encoding = cfg.data, Encoding()
    kept, long_prompts, long_responses, prompt_tokens, real_tokens = [], 0, 0, [], []
    for ex in examples:
        try:
            n_prompt = len(encode_prompt(tokenizer, ex.prompt))
            n_real = len(encode_response(tokenizer, ex.prompt, ex.real, counts=encoding))
        except UserError as e:
            raise UserError(f"{ex.source.rsplit(':', 1)[0]}, row {ex.source.rsplit(':', 1)[1]}: {e}") from None
        if n_prompt > d.max_prompt_length:
            long_prompts += 1
            if d.prompt_overflow == "drop":
                continue
        room = d.max_length - min(n_prompt, d.max_prompt_length)
        long_responses += n_real > room
        prompt_tokens.append(min(n_prompt, d.max_prompt_length))
        real_tokens.append(min(n_real, room))
        kept.append(ex)
    action = "dropped" if d.prompt_overflow == "drop" else "truncated from the left"
    if long_prompts:
        log.warning("%s: %d prompts longer than data.max_prompt_length=%d (%s)", name, long_prompts,
                    d.max_prompt_length, action)
    if long_responses:
        log.warning("%s: %d real responses cut to fit data.max_length=%d", name, long_responses, d.max_length)
    if encoding.fallback:
        log.warning("%s: for %d of %d responses the chat template's tokens of the whole conversation do not start "
                    "with the prompt's tokens (the tokenizer merges across the boundary); their response text is "
                    "tokenized on its own after the prompt's tokens, as generation continues the prompt",
                    name, encoding.fallback, encoding.fallback + encoding.template)
    n = max(len(kept), 1)
    stats = {"rows": len(kept), "long_prompts": long_prompts, "long_prompts_action": action,
             "responses_cut": long_responses, "prompt_tokens_mean": sum(prompt_tokens) / n,
             "prompt_tokens_max": max(prompt_tokens, default=0), "real_tokens_mean": sum(real_tokens) / n,
             "real_tokens_max": max(real_tokens, default=0), "responses_encoded_alone": encoding.fallback}
    return kept, stats


def _load(cfg: Config, role: str, max_rows: int | None, sources: dict | None = None) -> tuple[list[Example], dict]:
    """The examples of data role `role` (train, val, eval) with its split, subset and revision; a Hub dataset's
    commit and files go to `sources[role]`."""
    d, counts = cfg.data, {}
    examples = load_examples(getattr(d, role), split=getattr(d, f"{role}_split"), format=d.format, turn=d.turn,
                             max_rows=max_rows, counts=counts, subset=getattr(d, f"{role}_subset"),
                             revision=getattr(d, f"{role}_revision"))
    hub_read = counts.pop("hub", None)
    if hub_read and sources is not None:
        sources[role] = hub_read
    return examples, counts


def _policy(cfg: Config, tokenizer, examples: list[Example], counts: dict, name: str) -> tuple[list[Example], dict]:
    kept, stats = apply_length_policy(examples, tokenizer, cfg, name)
    return kept, {"duplicates": 0, **stats, **counts}


def _split(cfg: Config, tokenizer, role: str, max_rows: int | None, sources: dict) -> tuple[list[Example], dict]:
    return _policy(cfg, tokenizer, *_load(cfg, role, max_rows, sources), name=getattr(cfg.data, role))


def validation_split(cfg: Config, train: list[Example], name: str) -> tuple[list[Example], list[Example]]:
    """Without data.val: data.val_size training rows (seeded by run.seed) become the validation data
    that selection uses; they are not trained on."""
    d = cfg.data
    if d.val or not d.val_size:
        return train, []
    train, val = split_validation(train, d.val_size, cfg.run.seed, d.max_eval_rows)
    log.info("data: %d of %d training rows of %s split off as validation data (data.val_size=%g, run.seed %d): "
             "SFT early stopping, in-iteration checks and RUN/best select on them; they are not trained on",
             len(val), len(train) + len(val), name, d.val_size, cfg.run.seed)
    return train, val


def require_validation(cfg: Config, val: list[Example]) -> None:
    """Selection needs validation data: never select on the held-out data that is reported."""
    if val:
        return
    needs = [k for k, on in (("sft.patience", cfg.sft.enabled and cfg.sft.patience > 0),
                             ("train.eval_every", cfg.train.eval_every > 0)) if on]
    if needs:
        raise UserError(f"{' and '.join(needs)} select on validation data, and there is none: set data.val, or "
                        "data.val_size > 0 to split some off the training rows (selecting on data.eval would "
                        "flatter the reported numbers)")


def plan(cfg: Config, train: dict) -> list[dict]:
    """Estimated tokens per iteration: generation (prompts read + at most max_new_tokens each),
    scoring and training (prompt + real + generated per pair, generated at most max_new_tokens)."""
    rows, new = train["rows"], cfg.generation.max_new_tokens
    pair = train["prompt_tokens_mean"] + train["real_tokens_mean"] + new
    out = []
    for t in range(cfg.spin.iterations):
        pairs = rows * min(t + 1, cfg.spin.mix_window)
        out.append({"iteration": t, "generate_prompt_tokens": round(rows * train["prompt_tokens_mean"]),
                    "generate_new_tokens_max": rows * new, "pairs": pairs, "score_tokens_max": round(pairs * pair),
                    "train_tokens_max": round(pairs * pair * cfg.train.epochs)})
    return out


def disk_need(cfg: Config, model: dict) -> dict:
    """Bytes the run will still write (fp32 models per iteration, one training checkpoint with its
    optimizer state) against the free space where run.dir lives."""
    run_dir = Path(cfg.run.dir)
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if not model:
        return {"free_bytes": free, "need_bytes": None}
    fp32 = model["parameters"] * 4
    layout = RunLayout(run_dir)
    models = (not (layout.sft() / "model.done").exists() and cfg.sft.enabled) + sum(
        not (layout.iteration(t) / "model.done").exists() for t in range(cfg.spin.iterations))
    optimizer = fp32 * (2 if cfg.train.optimizer == "adamw" else 1)
    need = models * fp32 + (fp32 + optimizer if cfg.train.checkpoint_every and models else 0)
    if need > free:
        raise UserError(f"{probe}: about {need / 2**30:.2f} GiB are needed for the run's models and its training "
                        f"checkpoint ({models} models of {fp32 / 2**30:.2f} GiB in fp32), but only "
                        f"{free / 2**30:.2f} GiB are free; free space or set run.dir elsewhere")
    return {"free_bytes": free, "need_bytes": need}


def memory_plan(cfg: Config, model: dict, train: dict, world: int | None, device_gib: float | None) -> dict:
    """The per-device memory estimate (spinlm.memory) for `world` processes (default: this launch's),
    checked against `device_gib` (default: this process's GPU; none on a CPU); local and Hub models alike."""
    import torch

    from spinlm import dist, memory

    if not model:
        return {}
    world = world or dist.world()
    arch = memory.arch_of(cfg.model.name_or_path, model["parameters"], cfg.model.trust_remote_code,
                          cfg.model.revision)
    if arch is None:
        return {"lines": ["memory: unknown (config.json lacks hidden_size, num_hidden_layers, num_attention_heads "
                          "or vocab_size)"]}
    on_gpu = torch.cuda.is_available() or device_gib is not None
    plan = memory.estimate(cfg, arch, world, memory.row_tokens(cfg, train["prompt_tokens_max"],
                                                                 train["real_tokens_max"]), on_gpu)
    if device_gib is not None:
        device_bytes, device = int(device_gib * memory.GIB), f"the planned device ({device_gib:g} GiB)"
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device_bytes, device = props.total_memory, f"GPU {torch.cuda.current_device()} ({props.name})"
    else:
        device_bytes, device = None, "no GPU here"
    plan["lines"] = memory.lines(plan, device_bytes, device)
    if cfg.run.check_memory:
        memory.check(plan, device_bytes, device)
    return plan


def check(cfg: Config, world: int | None = None, device_gib: float | None = None) -> Checked:
    """Run every check; return the examples (after the length policy) and the report. `world` and
    `device_gib` plan the memory for another launch than this one (`spinlm validate --world-size
    --device-gib`)."""
    from spinlm.metrics import load_checker

    if cfg.peft.enabled:
        require_peft()
    require_trackers(cfg)
    model = model_weights(cfg.model.name_or_path, cfg.model.revision)  # an unknown Hub id or revision fails here
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model)
    load_checker(cfg.eval.checker)
    backend_for(cfg).preflight()  # the generation backend's packages; a server's reachability
    d, splits, sources = cfg.data, {}, {}
    rows, counts = _load(cfg, "train", d.max_train_rows, sources)
    rows, split_val = validation_split(cfg, rows, d.train)
    train, splits["train"] = _policy(cfg, tokenizer, rows, counts, d.train)
    if not train:
        raise UserError(f"{d.train}: no training examples left after the length policy "
                        f"(data.prompt_overflow=drop, data.max_prompt_length={d.max_prompt_length})")
    val, held = [], []
    if d.val:
        val, splits["val"] = _split(cfg, tokenizer, "val", d.max_eval_rows, sources)
    elif split_val:
        val, splits["val"] = _policy(cfg, tokenizer, split_val, {}, f"{d.train} (validation split)")
    require_validation(cfg, val)
    if d.eval:
        held, splits["eval"] = _split(cfg, tokenizer, "eval", d.max_eval_rows, sources)
    log.info("data: %d train, %d validation, %d held-out examples", len(train), len(val), len(held))
    return Checked(train, val, held, splits, model, plan(cfg, splits["train"]), disk_need(cfg, model),
                   memory_plan(cfg, model, splits["train"], world, device_gib), provenance(cfg, model, sources))


def provenance(cfg: Config, model: dict, sources: dict) -> dict:
    """What exactly was read: the model's id, revision and the commit it resolved to (Hub models), and each Hub
    dataset's commit and files."""
    return {"model": {"name_or_path": cfg.model.name_or_path, "revision": cfg.model.revision,
                      "commit": model.get("commit")}, "data": sources}


def report(c: Checked) -> str:
    """The human summary `spinlm validate` prints."""
    lines = ["data:"]
    for name, s in c.splits.items():
        lines.append(f"  {name}: {s['rows']} rows; prompt tokens mean {s['prompt_tokens_mean']:.1f} max "
                     f"{s['prompt_tokens_max']}; real response tokens mean {s['real_tokens_mean']:.1f} max "
                     f"{s['real_tokens_max']}; {s['long_prompts']} prompts over the limit "
                     f"({s['long_prompts_action']}), {s['responses_cut']} responses cut to fit, "
                     f"{s['duplicates']} duplicate rows dropped")
    if c.model:
        commit = f" at commit {c.model['commit']}" if c.model.get("commit") else ""
        lines.append(f"model{commit}: {c.model['parameters'] / 1e6:.1f}M parameters, "
                     f"{c.model['weights_bytes'] / 2**20:.1f} MiB of safetensors (from {c.model['source']})")
    need = c.disk.get("need_bytes")
    lines.append(f"disk: {'unknown (Hub model)' if need is None else f'{need / 2**30:.2f} GiB'} needed, "
                 f"{c.disk['free_bytes'] / 2**30:.1f} GiB free")
    lines.extend(c.memory.get("lines", ["memory: unknown (no model size)"]))
    lines.append("estimated tokens per iteration (upper bounds: generated responses counted at max_new_tokens):")
    lines.append("  iteration | pairs | generate (prompt + new) | score | train")
    for p in c.plan:
        lines.append(f"  {p['iteration']} | {p['pairs']} | {p['generate_prompt_tokens']} + "
                     f"{p['generate_new_tokens_max']} | {p['score_tokens_max']} | {p['train_tokens_max']}")
    lines.append("ok: no problems found")
    return "\n".join(lines)
