"""Typed configuration: dataclasses whose `help` metadata is the documentation.

Precedence: dataclass defaults < YAML file < command-line `--section.key=value` flags.
An unknown key is an error naming the closest valid key; every value is type-checked and
all cross-field problems are reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (mutable defaults through default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RunConfig:
    dir: str = _f("runs/spin", "Run directory: every output of the run lives here; re-running resumes it.")
    seed: int = _f(42, "Seed for data order, initialisation and sampling.")
    progress: bool = _f(True, "Show progress (stderr): bars on a terminal; elsewhere (a log file, a pipe) one log "
                        "line every run.progress_every_s seconds with done / total, rate and ETA.")
    progress_every_s: float = _f(30.0, "Seconds between two progress lines when stderr is not a terminal.")
    log_every: int = _f(10, "Log training metrics every N optimizer steps (to the log and to run.report_to).")
    report_to: str | list[str] = _f([], "Experiment trackers that get the run's metrics, one global step axis across "
                                    "SFT and the iterations: a list of tensorboard (RUN/tensorboard), wandb, trackio, "
                                    "mlflow (each `pip install 'spinlm[NAME]'`); [] or none = only spinlm's JSON "
                                    "files.")
    dist_timeout_min: float = _f(360.0, "Several processes (torchrun): minutes a process waits at a collective before "
                                 "the run fails. It must cover the longest wait: the other processes wait while rank "
                                 "0 alone feeds a generation server (generation.backend: server) or runs the one vLLM "
                                 "engine of generation.vllm_layout: tensor (torch's default: 30, NCCL's: 10).")
    check_memory: bool = _f(True, "Before a run, estimate the memory per device (README 'Scaling out' has the sums; "
                            "`spinlm validate` prints it) and refuse a plan that does not fit the GPU; false skips "
                            "the refusal (the estimate is approximate).")
    deterministic: bool = _f(False, "Use deterministic kernels only (torch.use_deterministic_algorithms): with it, "
                             "a run killed and resumed ends with the same weights as an uninterrupted one on CPU.")


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "The SFT model to start from: a local directory or a Hub id.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model.")
    tokenizer: str | None = _f(None, "Tokenizer directory or Hub id, if not the model's own.")
    chat_template: str | None = _f(
        None, "Jinja chat template (text, or path to a .jinja file) used instead of the tokenizer's."
    )
    dtype: str = _f("auto", "Weights dtype for generation and scoring: auto, float32, bfloat16, float16. "
                    "auto = bfloat16 on a GPU that supports it, else float32.")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager, flash_attention_2, ...")
    trust_remote_code: bool = _f(False, "Run code shipped with the model repo. Off unless you trust it.")


@dataclass
class DataConfig:
    train: str = _f("", "Training data: a .jsonl/.json/.parquet file or a Hub dataset id.")
    train_split: str = _f("train", "Split to use when `train` is a Hub dataset id.")
    val: str | None = _f(None, "Validation data: what SFT early stopping, in-iteration checks (train.eval_every) and "
                         "RUN/best select on (default: a slice of the training rows, data.val_size).")
    val_split: str = _f("validation", "Split to use when `val` is a Hub dataset id.")
    val_size: float = _f(0.05, "Without data.val: the share (below 1) or number (1 and up) of training rows split off, "
                         "seeded by run.seed, as validation data (at most data.max_eval_rows; they are not trained "
                         "on); 0 = none, and then nothing is selected (no early stopping, checks or RUN/best).")
    eval: str | None = _f(None, "Held-out data for the reported metrics (same formats as `train`); never selected "
                          "on.")
    eval_split: str = _f("test", "Split to use when `eval` is a Hub dataset id.")
    format: str = _f("auto", "Input format: auto, spin, messages, trl, prompt_response, alpaca.")
    turn: str = _f("first", "Which assistant turn is the real response: first (the paper) or last.")
    max_train_rows: int | None = _f(None, "Use only the first N training rows (after dedupe).")
    max_eval_rows: int | None = _f(200, "Use only the first N held-out rows.")
    max_prompt_length: int = _f(512, "Longest prompt, in tokens.")
    max_length: int = _f(1024, "Longest prompt + response, in tokens; longer responses are cut.")
    prompt_overflow: str = _f("truncate", "Prompts over max_prompt_length: truncate (keep the end) or drop.")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(256, "Most tokens generated per response.")
    temperature: float = _f(1.0, "Sampling temperature (the paper: 1.0).")
    top_p: float = _f(1.0, "Nucleus sampling threshold (the paper: 1.0).")
    top_k: int = _f(0, "Sample from the k most likely tokens only; 0 = off.")
    batch_size: int = _f(64, "Most prompts per generation batch (batches are sorted by prompt length).")
    batch_tokens: int = _f(16384, "Token budget of a generation batch: rows x (longest prompt + max_new_tokens).")
    backend: str = _f("local", "local (transformers generate in this process), server (an OpenAI-compatible "
                      "/v1/completions server: vLLM, SGLang, TGI, transformers serve; needs "
                      "`pip install 'spinlm[server]'`) or vllm (a vLLM engine in this process; needs vLLM installed).")
    server_url: str | None = _f(None, "backend server, unmanaged: base URL of a running server, e.g. "
                                "http://127.0.0.1:8000 (a trailing /v1 is fine); it must serve the model being generated with.")
    server_command: str | None = _f(None, "backend server, managed: command started for each model, with {model} and "
                                    "{port} placeholders, e.g. 'vllm serve {model} --port {port}'; stopped after use.")
    server_model: str | None = _f(None, "Model name sent in requests (default: the model path being generated with).")
    concurrency: int = _f(8, "backend server: most requests in flight at once.")
    timeout_s: float = _f(300.0, "backend server: seconds to wait for one response.")
    retries: int = _f(4, "backend server: retries (exponential backoff) on connection errors, timeouts, "
                         "HTTP 408/409/429/5xx.")
    server_start_timeout_s: float = _f(600.0, "backend server, managed: seconds to wait for the server's /health.")
    api_key_env: str | None = _f(None, "backend server: name of the environment variable holding the API key "
                                 "(sent as a Bearer token; the key itself is never logged or saved).")
    vllm_layout: str = _f("data", "backend vllm, several processes (torchrun): data = each process runs an engine of "
                          "its own on its own GPU over its share of the rows; tensor = rank 0 alone runs one engine "
                          "over every GPU of its node (--tensor-parallel-size = the processes on that node unless "
                          "vllm_args sets it) while the other processes wait, their device memory released.")
    vllm_args: str | None = _f(None, "backend vllm: engine flags as for `vllm serve`, e.g. '--tensor-parallel-size 8 "
                               "--max-model-len 4096' (spinlm adds --dtype, --seed and --generation-config vllm "
                               "unless given).")


@dataclass
class SPINConfig:
    iterations: int = _f(3, "Number of self-play iterations T.")
    mix_window: int = _f(2, "Iteration t trains on the pairs generated in the last N iterations (paper: 2).")
    beta: float | list[float] = _f(0.1, "The paper's lambda: one value, or one per iteration.")
    loss_type: str = _f("sigmoid", "sigmoid (the paper's logistic loss) or hinge (objective spin only).")
    objective: str = _f("spin", "The objective: spin (the paper's, with loss_type), space (noise-contrastive, "
                        "SPACE 2025: real and generated responses get absolute targets), sppo_hard (SPPO's squared "
                        "loss, log-ratios pinned to +-1/(2 beta)) or tspin (T-SPIN 2025: triplets with the starting "
                        "model's response kept from iteration 0; reference-free). spinlm/loss.py has the formulas.")
    space_mu: float = _f(1.0, "objective space: the noise ratio mu (generated responses per real one; 1 recommended).")
    tspin_alpha: float = _f(1.0, "objective tspin: alpha, the scale of both log-prob gaps (used in spin.beta's place).")
    tspin_history_weight: float = _f(0.1, "objective tspin: the paper's beta, the weight of the historical term "
                                     "(0 at iteration 0, where y' and y0 come from the same model).")
    sft_weight: float = _f(0.0, "Add sft_weight x the real response's NLL per token to each pair's loss (a "
                           "regulariser, TRL's rpo_alpha); 0 = the paper's loss.")
    drop_dead_pairs: bool = _f(False, "Leave out of training the pairs whose generated response equals the real one "
                               "(they carry no SPIN gradient; they are counted in the logs either way).")


@dataclass
class TrainConfig:
    learning_rate: float | list[float] = _f(5e-7, "Peak learning rate: one value, or one per iteration.")
    optimizer: str = _f("rmsprop", "rmsprop (the paper's) or adamw.")
    weight_decay: float = _f(0.0, "Weight decay.")
    epochs: int = _f(2, "Epochs over the iteration's pairs.")
    max_steps: int | None = _f(None, "Stop an iteration after this many optimizer steps.")
    batch_size: int = _f(8, "Pairs per micro-batch (per process).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = _f(0.1, "Share of the steps spent warming the learning rate up linearly.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this; 0 = no clipping.")
    mixed_precision: str = _f("auto", "auto (bf16 on a GPU that supports it), no, bf16, fp16.")
    strategy: str = _f("ddp", "How training (SFT, SPIN, DPO) spreads over the processes of `torchrun ... -m spinlm`: "
                       "ddp (each holds the whole model, gradients and optimizer state) or fsdp (FSDP2: each holds "
                       "1/N of them, weights gathered a layer at a time; bf16 compute on a GPU with "
                       "mixed_precision auto/bf16) or zero3 (DeepSpeed ZeRO-3, `pip install 'spinlm[deepspeed]'`: "
                       "each holds 1/N of them, fp32 partitions, bf16 compute on a GPU with mixed_precision auto/bf16). "
                       "README 'Scaling out' has the memory sums.")
    fsdp_cpu_offload: bool = _f(False, "strategy fsdp: keep the sharded weights, gradients and optimizer state in CPU "
                                "memory (the optimizer steps on the CPU): for a model that does not fit otherwise, "
                                "at the cost of speed.")
    fsdp_inference: bool = _f(False, "strategy fsdp: the score and evaluate stages (and `spinlm score` / `evaluate`) "
                              "shard the model over the processes too, so none holds it whole (for a model that "
                              "does not fit one device; slower: every forward gathers each layer, and evaluation's "
                              "greedy generation runs every example on every process). Generation is not sharded: "
                              "use generation.backend server or vllm.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    checkpoint_every: int = _f(50, "Save a resumable checkpoint (weights, optimizer, scheduler, data position, RNG) "
                               "every N optimizer steps; 0 = never (a killed iteration then starts over).")
    warn_real_logp_drop: float = _f(0.05, "Warn when the real responses' log-prob per token falls below the "
                                    "reference's by more than this many nats (averaged over a logging window): "
                                    "the model is unlearning the data.")
    eval_every: int = _f(0, "Every N optimizer steps (and at the end) check the held-out metric on the validation "
                         "data (task accuracy with eval.checker, else NLL of the real responses) and keep the best "
                         "weights of the iteration; 0 = off (the last weights are kept).")
    patience: int = _f(0, "With eval_every: stop the iteration after N checks without improvement; 0 = never.")
    disable_dropout: bool = _f(True, "Turn the policy's dropout off in SPIN/DPO training (TRL's default): the reference "
                               "log-probs are computed without dropout, so with it the policy differs from its "
                               "reference at step 0. SFT keeps the model's dropout; a LoRA adapter keeps peft.dropout.")
    skip_grad_norm_above: float | None = _f(None, "Skip (and count) optimizer updates whose gradient norm, before "
                                            "clipping, exceeds this; null = never skip (not with strategy zero3).")


@dataclass
class PackingConfig:
    enabled: bool = _f(True, "Score and train on packed rows: [prompt | real | generated] with the prompt once and "
                       "no padding (checked against the plain computation once per model; falls back if unequal).")
    max_tokens: int = _f(512, "Token budget of one packed row (a longer pair gets a row of its own; rows of a "
                         "micro-batch are padded to the longest). Pairs in a row attend through the mask, so "
                         "longer rows spend more on attention.")
    backward_per_row: bool = _f(True, "In training (SPIN, DPO and SFT stages), run forward and backward one packed "
                                "row at a time (gradients "
                                "add up to the same step), so activations of one row, not of the whole "
                                "micro-batch, are held at once.")


@dataclass
class SFTConfig:
    enabled: bool = _f(False, "Run supervised fine-tuning on the training data before SPIN.")
    learning_rate: float = _f(2e-5, "Peak learning rate (AdamW).")
    epochs: int = _f(3, "Most epochs.")
    batch_size: int = _f(16, "Examples per micro-batch (per process).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = _f(0.05, "Warm-up share of the steps.")
    weight_decay: float = _f(0.0, "Weight decay.")
    patience: int = _f(0, "Stop after N evaluations without a better held-out NLL; 0 = never stop early.")
    eval_every: int = _f(0, "Evaluate held-out NLL every N steps (and at each epoch end); 0 = epoch ends only.")


@dataclass
class PeftConfig:
    enabled: bool = _f(False, "Train a LoRA adapter (needs `pip install 'spinlm[lora]'`) instead of every weight; "
                       "it is merged into the weights at the end of each iteration (and of SFT), so every saved "
                       "model is a plain transformers model (in the fp32 training dtype).")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = _f(0.0, "Dropout on the LoRA input, in [0, 1).")
    target_modules: str | list[str] = _f("all-linear", "Modules that get an adapter: 'all-linear' (every linear "
                                         "layer but the output head) or a list of module names, e.g. "
                                         "[q_proj, v_proj].")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "Evaluate the SFT model and each iteration on the held-out data.")
    checker: str | None = _f(None, "Task checker 'module:function' taking (example, generated_text) -> bool.")
    max_new_tokens: int | None = _f(None, "Greedy generation length for the task metric (default: generation's).")
    batch_size: int = _f(32, "Batch size for held-out generation and scoring.")
    continued_sft: bool = _f(False, "Also train the baseline the paper compares with: the start model fine-tuned "
                             "further on the real responses (sft.learning_rate, no early stopping) for as many "
                             "optimizer steps of train.batch_size examples as all SPIN iterations took; it is "
                             "evaluated and listed as continued-sft (never chosen as RUN/best).")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    spin: SPINConfig = field(default_factory=SPINConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def per_iteration(self, name: str, t: int) -> float:
        """lr or beta for iteration t (a scalar, or the t-th entry of a list)."""
        value = self.train.learning_rate if name == "learning_rate" else self.spin.beta
        return float(value[t] if isinstance(value, list) else value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}

CHOICES = {
    ("model", "dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("generation", "backend"): ("local", "server", "vllm"),
    ("generation", "vllm_layout"): ("data", "tensor"),
    ("data", "format"): ("auto", "spin", "messages", "trl", "prompt_response", "alpaca"),
    ("data", "turn"): ("first", "last"),
    ("data", "prompt_overflow"): ("truncate", "drop"),
    ("spin", "loss_type"): ("sigmoid", "hinge"),
    ("spin", "objective"): ("spin", "space", "sppo_hard", "tspin"),
    ("train", "optimizer"): ("rmsprop", "adamw"),
    ("train", "mixed_precision"): ("auto", "no", "bf16", "fp16"),
    ("train", "strategy"): ("ddp", "fsdp", "zero3"),
}
PLANNED: dict[tuple[str, str, str], str] = {}  # (section, key, value) -> why a value to come is refused for now


def _nearest(name: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys: {', '.join(prefix + o for o in options)}"


class Raw(str):
    """A command-line value as typed: text fields take it verbatim, others parse it as YAML."""


def _accepts_str(hint: Any) -> bool:
    return hint is str or str in typing.get_args(hint)


def _from_flag(value: Raw, hint: Any, key: str) -> Any:
    if value == "" and type(None) in typing.get_args(hint):
        return None
    if _accepts_str(hint) and not (value.startswith("[") or value.lower() in ("null", "~", "none")):
        return str(value)
    try:
        return yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        raise UserError(f"{key}: cannot read {str(value)!r} as {_type_name(hint)}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check and convert one value against its type hint; UserError when it does not fit."""
    if isinstance(value, Raw):
        value = _from_flag(value, hint, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except UserError as e:
                errors.append(str(e))
        finite = [e for e in errors if "finite" in e]
        raise UserError(finite[0] if finite else errors[-1] if len(options) == 2 and type(None) in options else
                        f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-7" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted `no` / `yes` as a boolean
            return "yes" if value else "no"
        if isinstance(value, (int, float)):  # e.g. a revision written as 20240101
            return str(value)
    raise UserError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, str(hint))


def merge(cfg: Config, data: dict[str, Any], origin: str) -> Config:
    """Apply a nested {section: {key: value}} mapping onto cfg, checking names and types."""
    if not isinstance(data, dict):
        raise UserError(f"{origin}: expected a mapping of sections (run, model, data, ...), got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise UserError(f"{origin}: unknown section '{section}'{_nearest(str(section), list(SECTIONS))}")
        if not isinstance(values, dict):
            raise UserError(f"{origin}: section '{section}' must be a mapping of keys, got {values!r}")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                hint = _nearest(str(key), list(hints), section + ".")
                raise UserError(f"{origin}: unknown key '{section}.{key}'{hint}")
            setattr(target, key, _coerce(value, hints[key], f"{origin}: {section}.{key}"))
    return cfg


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.key=value` (or `--section.key value`) flags -> nested dict; values read as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unrecognized argument '{arg}': overrides look like --section.key=value")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
                raise UserError(f"--{name} needs a value: --{name}=VALUE")
            i += 1
            raw = args[i]
        section, _, key = name.partition(".")
        if not key or "." in key:
            raise UserError(f"unrecognized argument '{arg}': overrides look like --section.key=value")
        if not section:
            raise UserError(f"unrecognized argument '{arg}': overrides look like --section.key=value")
        out.setdefault(section, {})[key] = Raw(raw)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file safely (yaml.safe_load only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return data or {}


def build(yaml_path: str | Path | None = None, overrides: list[str] | None = None,
          base: dict[str, Any] | None = None) -> Config:
    """defaults < base (e.g. the demo's) < YAML file < command-line overrides."""
    cfg = Config()
    if base:
        merge(cfg, base, "built-in defaults")
    if yaml_path is not None:
        merge(cfg, load_yaml(yaml_path), str(yaml_path))
    if overrides:
        merge(cfg, parse_overrides(overrides), "command line")
    return cfg


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")


def trackers(run: RunConfig) -> list[str]:
    """run.report_to as a list of tracker names ('none' and [] are none; a name alone is a list of one)."""
    names = [run.report_to] if isinstance(run.report_to, str) else list(run.report_to)
    return list(dict.fromkeys(n for n in names if n not in ("none", "")))


def validate(cfg: Config, *, need: tuple[str, ...] = ("model", "data")) -> None:
    """Cross-field checks; every problem is reported at once."""
    problems = [f"run.report_to: unknown tracker '{n}'" + _nearest(n, list(TRACKERS)).replace("valid keys", "one of")
                for n in trackers(cfg.run) if n not in TRACKERS]
    if cfg.run.progress_every_s < 0:
        problems.append(f"run.progress_every_s must be >= 0; got {cfg.run.progress_every_s}")
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            planned = PLANNED.get((section, key, value))
            problems.append(f"{section}.{key} must be one of {', '.join(choices)}; got {value!r}"
                            + (f" ({planned})" if planned else ""))
    if "model" in need and not cfg.model.name_or_path:
        problems.append("model.name_or_path is required (a local model directory or a Hub id)")
    if "data" in need and not cfg.data.train:
        problems.append("data.train is required (a .jsonl/.json/.parquet file or a Hub dataset id)")
    positive = {"spin.iterations": cfg.spin.iterations, "spin.mix_window": cfg.spin.mix_window,
                "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "generation.max_new_tokens": cfg.generation.max_new_tokens,
                "generation.batch_size": cfg.generation.batch_size,
                "generation.batch_tokens": cfg.generation.batch_tokens, "data.max_length": cfg.data.max_length,
                "data.max_prompt_length": cfg.data.max_prompt_length, "sft.epochs": cfg.sft.epochs,
                "sft.batch_size": cfg.sft.batch_size,
                "sft.gradient_accumulation_steps": cfg.sft.gradient_accumulation_steps, "sft.learning_rate": cfg.sft.learning_rate,
                "generation.temperature": cfg.generation.temperature, "eval.batch_size": cfg.eval.batch_size,
                "run.log_every": cfg.run.log_every, "packing.max_tokens": cfg.packing.max_tokens}
    problems += [f"{k} must be > 0; got {v}" for k, v in positive.items() if v <= 0]
    for name, value in (("train.learning_rate", cfg.train.learning_rate), ("spin.beta", cfg.spin.beta)):
        values = value if isinstance(value, list) else [value]
        if any(v <= 0 for v in values):
            problems.append(f"{name} must be > 0; got {value}")
        if isinstance(value, list) and len(value) < cfg.spin.iterations:
            problems.append(f"{name} lists {len(value)} values but spin.iterations is {cfg.spin.iterations}: "
                            "give one value, or one per iteration")
    if not 0 < cfg.generation.top_p <= 1:
        problems.append(f"generation.top_p must be in (0, 1]; got {cfg.generation.top_p}")
    for key in ("train.warmup_ratio", "sft.warmup_ratio"):
        section, name = key.split(".")
        if not 0 <= getattr(getattr(cfg, section), name) < 1:
            problems.append(f"{key} must be in [0, 1)")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        problems.append("data.max_prompt_length must be smaller than data.max_length")
    if cfg.data.val_size < 0 or (cfg.data.val_size >= 1 and cfg.data.val_size != int(cfg.data.val_size)):
        problems.append(f"data.val_size must be a share in [0, 1) or a whole number of rows; got {cfg.data.val_size}")
    if cfg.spin.sft_weight < 0:
        problems.append(f"spin.sft_weight must be >= 0; got {cfg.spin.sft_weight}")
    if cfg.spin.objective != "spin" and cfg.spin.loss_type != "sigmoid":
        problems.append(f"spin.loss_type {cfg.spin.loss_type} applies to spin.objective spin only; "
                        f"got spin.objective {cfg.spin.objective}")
    if not cfg.spin.space_mu > 0:
        problems.append(f"spin.space_mu must be > 0; got {cfg.spin.space_mu}")
    if not cfg.spin.tspin_alpha > 0 or not cfg.spin.tspin_history_weight >= 0:
        problems.append(f"spin.tspin_alpha must be > 0 and spin.tspin_history_weight >= 0; got "
                        f"{cfg.spin.tspin_alpha}, {cfg.spin.tspin_history_weight}")
    for key in ("eval_every", "patience"):
        if getattr(cfg.train, key) < 0:
            problems.append(f"train.{key} must be >= 0; got {getattr(cfg.train, key)}")
    if cfg.train.checkpoint_every < 0:
        problems.append(f"train.checkpoint_every must be >= 0; got {cfg.train.checkpoint_every}")
    if cfg.train.skip_grad_norm_above is not None and cfg.train.skip_grad_norm_above <= 0:
        problems.append(f"train.skip_grad_norm_above must be > 0 when set; got {cfg.train.skip_grad_norm_above}")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        problems.append("train.max_steps must be > 0 when set")
    problems += _server_problems(cfg.generation)
    problems += _peft_problems(cfg.peft)
    problems += _strategy_problems(cfg)
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _server_problems(g: GenerationConfig) -> list[str]:
    """Cross-field rules of generation.backend = server."""
    problems = [f"generation.{k} must be > 0; got {getattr(g, k)}"
                for k in ("concurrency", "timeout_s", "server_start_timeout_s") if getattr(g, k) <= 0]
    if g.retries < 0:
        problems.append(f"generation.retries must be >= 0; got {g.retries}")
    if g.backend != "server":
        return problems
    if bool(g.server_url) == bool(g.server_command):
        problems.append("generation.backend is server: set exactly one of generation.server_url (a running server) "
                        "or generation.server_command (a server spinlm starts, e.g. 'vllm serve {model} --port {port}')")
    if g.server_url and not g.server_url.startswith(("http://", "https://")):
        problems.append(f"generation.server_url must start with http:// or https://; got {g.server_url!r}")
    if g.server_command:
        missing = [p for p in ("{model}", "{port}") if p not in g.server_command]
        if missing:
            problems.append(f"generation.server_command must contain {' and '.join(missing)} (spinlm fills in the "
                            f"model path and a free port); got {g.server_command!r}")
    return problems


def _strategy_problems(cfg: Config) -> list[str]:
    """Combinations train.strategy does not support (yet)."""
    tc, problems = cfg.train, []
    if tc.fsdp_cpu_offload and tc.strategy != "fsdp":
        problems.append(f"train.fsdp_cpu_offload applies to train.strategy fsdp only; got train.strategy {tc.strategy}")
    if tc.fsdp_inference and tc.strategy != "fsdp":
        problems.append(f"train.fsdp_inference applies to train.strategy fsdp only; got train.strategy {tc.strategy}")
    if tc.strategy == "ddp":
        return problems
    if cfg.peft.enabled:
        problems.append(f"peft.enabled with train.strategy {tc.strategy} is not supported yet: train the LoRA adapter "
                        f"with train.strategy ddp (the frozen weights are not sharded), or train every weight with "
                        f"{tc.strategy}")
    if tc.mixed_precision == "fp16":
        problems.append(f"train.mixed_precision fp16 with train.strategy {tc.strategy} is not supported (it needs a "
                        "sharded gradient scaler): use bf16 (or auto) or no")
    if tc.strategy == "zero3" and tc.skip_grad_norm_above is not None:
        problems.append("train.skip_grad_norm_above with train.strategy zero3 is not supported: DeepSpeed knows the "
                        "gradient norm only inside its optimizer step, so an update cannot be skipped on it; use "
                        "train.max_grad_norm (clipping), or train.strategy fsdp or ddp")
    if tc.strategy == "zero3":
        from importlib.util import find_spec

        if find_spec("deepspeed") is None:
            problems.append("train.strategy zero3 needs DeepSpeed: pip install 'spinlm[deepspeed]' (on a machine "
                            "without CUDA: DS_BUILD_OPS=0 pip install 'spinlm[deepspeed]')")
    return problems


def _peft_problems(pc: PeftConfig) -> list[str]:
    problems = [f"peft.{k} must be > 0; got {v}" for k, v in (("r", pc.r), ("alpha", pc.alpha)) if v <= 0]
    if not 0 <= pc.dropout < 1:
        problems.append(f"peft.dropout must be in [0, 1); got {pc.dropout}")
    if pc.target_modules == [] or pc.target_modules == "":
        problems.append("peft.target_modules is empty: give 'all-linear' or a list of module names")
    return problems


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference() -> str:
    """Every config key with its type, default and help: for --help and the README."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)
