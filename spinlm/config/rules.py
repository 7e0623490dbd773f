"""validate(): the checks that need more than one field's type, reported all at once.

Each `_..._problems` helper returns its problems as lines; validate() joins them, in this order,
into one UserError, so a user fixes every mistake of a config in one go.
"""

from __future__ import annotations

import importlib.util

from spinlm.config.parse import nearest
from spinlm.config.schema import (
    CHOICES,
    PLANNED,
    TRACKERS,
    Config,
    GenerationConfig,
    PeftConfig,
    RunConfig,
    SPINConfig,
    TrainConfig,
    trackers,
)
from spinlm.errors import UserError
from spinlm.preempt import CATCHABLE


def validate(cfg: Config, *, need: tuple[str, ...] = ("model", "data")) -> None:
    """Cross-field checks; every problem is reported at once."""
    problems = [*_run_problems(cfg.run), *_choice_problems(cfg), *_required_problems(cfg, need),
                *_positive_problems(cfg), *_schedule_problems(cfg), *_range_problems(cfg),
                *_spin_problems(cfg.spin), *_train_problems(cfg.train), *_server_problems(cfg.generation),
                *_peft_problems(cfg.peft), *_strategy_problems(cfg)]
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _run_problems(run: RunConfig) -> list[str]:
    problems = [f"run.report_to: unknown tracker '{n}'" + nearest(n, list(TRACKERS)).replace("valid keys", "one of")
                for n in trackers(run) if n not in TRACKERS]
    if run.progress_every_s < 0:
        problems.append(f"run.progress_every_s must be >= 0; got {run.progress_every_s}")
    if run.preempt_grace_s < 0:
        problems.append(f"run.preempt_grace_s must be >= 0 (0 = no timer); got {run.preempt_grace_s}")
    problems += [f"run.preempt_signals: {name!r} is not a signal spinlm can stop on; valid: {', '.join(CATCHABLE)}"
                 for name in run.preempt_signals if name not in CATCHABLE]
    return problems + _hub_problems(run)


def _hub_problems(run: RunConfig) -> list[str]:
    if run.push_to_hub and not run.hub_model_id:
        return ["run.push_to_hub needs run.hub_model_id: the Hub repo to push to (NAME or ORG/NAME)"]
    problem = repo_id_problem(run.hub_model_id) if run.hub_model_id else None
    return [f"run.hub_model_id: {problem}"] if problem else []


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a Hub repo id (huggingface_hub's own check), or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"{repo_id!r} is not a Hub repo id (expected NAME or ORG/NAME): {e}"
    return None


def _choice_problems(cfg: Config) -> list[str]:
    """Every choice field (a Literal[...] in the schema) holds one of its values."""
    problems = []
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            planned = PLANNED.get((section, key, value))
            problems.append(f"{section}.{key} must be one of {', '.join(choices)}; got {value!r}"
                            + (f" ({planned})" if planned else ""))
    return problems


def _required_problems(cfg: Config, need: tuple[str, ...]) -> list[str]:
    """The inputs a command needs (`need` names them: `spinlm generate` has no use for data.train, say)."""
    problems = []
    if "model" in need and not cfg.model.name_or_path:
        problems.append("model.name_or_path is required (a local model directory or a Hub id)")
    if "data" in need and not cfg.data.train:
        problems.append("data.train is required (a .jsonl/.json/.parquet file or a Hub dataset id)")
    return problems


def _positive_problems(cfg: Config) -> list[str]:
    positive = {"spin.iterations": cfg.spin.iterations, "spin.mix_window": cfg.spin.mix_window,
                "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "generation.max_new_tokens": cfg.generation.max_new_tokens,
                "generation.batch_size": cfg.generation.batch_size,
                "generation.batch_tokens": cfg.generation.batch_tokens, "data.max_length": cfg.data.max_length,
                "data.max_prompt_length": cfg.data.max_prompt_length, "sft.epochs": cfg.sft.epochs,
                "sft.batch_size": cfg.sft.batch_size,
                "sft.gradient_accumulation_steps": cfg.sft.gradient_accumulation_steps,
                "sft.learning_rate": cfg.sft.learning_rate,
                "generation.temperature": cfg.generation.temperature, "eval.batch_size": cfg.eval.batch_size,
                "run.log_every": cfg.run.log_every, "packing.max_tokens": cfg.packing.max_tokens,
                "packing.score_max_tokens": cfg.packing.score_max_tokens,
                "judge.max_new_tokens": cfg.judge.max_new_tokens,
                "packing.logits_chunk_mb": cfg.packing.logits_chunk_mb}
    return [f"{k} must be > 0; got {v}" for k, v in positive.items() if v <= 0]


def _schedule_problems(cfg: Config) -> list[str]:
    """The per-iteration values (one, or a list with one per iteration)."""
    problems = []
    for name, value in (("train.learning_rate", cfg.train.learning_rate), ("spin.beta", cfg.spin.beta)):
        values = value if isinstance(value, list) else [value]
        if any(v <= 0 for v in values):
            problems.append(f"{name} must be > 0; got {value}")
        if isinstance(value, list) and len(value) < cfg.spin.iterations:
            problems.append(f"{name} lists {len(value)} values but spin.iterations is {cfg.spin.iterations}: "
                            "give one value, or one per iteration")
    return problems


def _range_problems(cfg: Config) -> list[str]:
    problems = []
    if not 0 < cfg.generation.top_p <= 1:
        problems.append(f"generation.top_p must be in (0, 1]; got {cfg.generation.top_p}")
    for key in ("train.warmup_ratio", "sft.warmup_ratio"):
        section, name = key.split(".")
        if not 0 <= getattr(getattr(cfg, section), name) < 1:
            problems.append(f"{key} must be in [0, 1)")
    temperatures = {**cfg.judge.temperatures, "(judge.default_temperature)": cfg.judge.default_temperature}
    problems += [f"judge.temperatures: {k} must be >= 0; got {v}" for k, v in temperatures.items() if v < 0]
    if cfg.judge.top_k < 0:
        problems.append(f"judge.top_k must be >= 0 (0 = off); got {cfg.judge.top_k}")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        problems.append("data.max_prompt_length must be smaller than data.max_length")
    if cfg.data.val_size < 0 or (cfg.data.val_size >= 1 and cfg.data.val_size != int(cfg.data.val_size)):
        problems.append(f"data.val_size must be a share in [0, 1) or a whole number of rows; got {cfg.data.val_size}")
    return problems


def _spin_problems(sc: SPINConfig) -> list[str]:
    """The objective's own parameters."""
    problems = []
    if sc.sft_weight < 0:
        problems.append(f"spin.sft_weight must be >= 0; got {sc.sft_weight}")
    if sc.objective != "spin" and sc.loss_type != "sigmoid":
        problems.append(f"spin.loss_type {sc.loss_type} applies to spin.objective spin only; "
                        f"got spin.objective {sc.objective}")
    if not sc.space_mu > 0:
        problems.append(f"spin.space_mu must be > 0; got {sc.space_mu}")
    if not sc.tspin_alpha > 0 or not sc.tspin_history_weight >= 0:
        problems.append(f"spin.tspin_alpha must be > 0 and spin.tspin_history_weight >= 0; got "
                        f"{sc.tspin_alpha}, {sc.tspin_history_weight}")
    return problems


def _train_problems(tc: TrainConfig) -> list[str]:
    """The step counts and thresholds of training (0 or None = off, where a field allows it)."""
    problems = []
    for key in ("eval_every", "patience"):
        if getattr(tc, key) < 0:
            problems.append(f"train.{key} must be >= 0; got {getattr(tc, key)}")
    if tc.checkpoint_every < 0:
        problems.append(f"train.checkpoint_every must be >= 0; got {tc.checkpoint_every}")
    if tc.skip_grad_norm_above is not None and tc.skip_grad_norm_above <= 0:
        problems.append(f"train.skip_grad_norm_above must be > 0 when set; got {tc.skip_grad_norm_above}")
    if tc.max_steps is not None and tc.max_steps <= 0:
        problems.append("train.max_steps must be > 0 when set")
    if tc.schedule_epochs is not None and tc.schedule_epochs < tc.epochs:
        problems.append(f"train.schedule_epochs must be at least train.epochs ({tc.epochs}) when set: the schedule "
                        f"would reach a learning rate of 0 before training ends; got {tc.schedule_epochs}")
    return problems


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
                        "or generation.server_command (a server spinlm starts, e.g. "
                        "'vllm serve {model} --port {port}')")
    if g.server_url and not g.server_url.startswith(("http://", "https://")):
        problems.append(f"generation.server_url must start with http:// or https://; got {g.server_url!r}")
    if g.server_command:
        missing = [p for p in ("{model}", "{port}") if p not in g.server_command]
        if missing:
            problems.append(f"generation.server_command must contain {' and '.join(missing)} (spinlm fills in the "
                            f"model path and a free port); got {g.server_command!r}")
    return problems


def _peft_problems(pc: PeftConfig) -> list[str]:
    problems = [f"peft.{k} must be > 0; got {v}" for k, v in (("r", pc.r), ("alpha", pc.alpha)) if v <= 0]
    if not 0 <= pc.dropout < 1:
        problems.append(f"peft.dropout must be in [0, 1); got {pc.dropout}")
    if pc.target_modules == [] or pc.target_modules == "":
        problems.append("peft.target_modules is empty: give 'all-linear' or a list of module names")
    return problems


def _strategy_problems(cfg: Config) -> list[str]:
    """Combinations train.strategy does not support (yet)."""
    tc, problems = cfg.train, []
    if tc.fsdp_cpu_offload and tc.strategy != "fsdp":
        problems.append(f"train.fsdp_cpu_offload applies to train.strategy fsdp only; got train.strategy {tc.strategy}")
    if tc.fsdp_inference and tc.strategy != "fsdp":
        problems.append(f"train.fsdp_inference applies to train.strategy fsdp only; got train.strategy {tc.strategy}")
    for key in ("zero3_offload_optimizer", "zero3_offload_params"):
        if getattr(tc, key) and tc.strategy != "zero3":
            problems.append(f"train.{key} applies to train.strategy zero3 only; got train.strategy {tc.strategy}")
    if tc.zero3_param_persistence_threshold < 0:
        problems.append(f"train.zero3_param_persistence_threshold must be >= 0 (a number of values); got "
                        f"{tc.zero3_param_persistence_threshold}")
    elif tc.zero3_param_persistence_threshold != type(tc)().zero3_param_persistence_threshold \
            and tc.strategy != "zero3":
        problems.append(f"train.zero3_param_persistence_threshold applies to train.strategy zero3 only; got "
                        f"train.strategy {tc.strategy}")
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
    # looked up through the module at call time, so a test can hide DeepSpeed by patching find_spec
    if tc.strategy == "zero3" and importlib.util.find_spec("deepspeed") is None:
        problems.append("train.strategy zero3 needs DeepSpeed: pip install 'spinlm[deepspeed]' (on a machine "
                        "without CUDA: DS_BUILD_OPS=0 pip install 'spinlm[deepspeed]')")
    return problems
