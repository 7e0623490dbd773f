"""The config's schema: one dataclass per section, each field's type, default and help text.

The `help` metadata is the documentation (`spinlm config` prints it). A field with a fixed set of
values is annotated `Literal[...]`; CHOICES is read from those annotations and validate() checks it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


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
    check_memory: bool = _f(True, "Before a run, estimate the memory per device (docs/scaling.md has the sums; "
                            "`spinlm validate` prints it) and refuse a plan that does not fit the GPU; false skips "
                            "the refusal (the estimate is approximate).")
    deterministic: bool = _f(False, "Use deterministic kernels only (torch.use_deterministic_algorithms): with it, "
                             "a run killed and resumed ends with the same weights as an uninterrupted one on CPU.")
    preempt_signals: list[str] = _f(["SIGTERM", "SIGUSR1"], "Signals that stop spinlm at the next safe point with "
                                    "exit code 75 ('preempted, re-run to resume'), Ctrl-C (SIGINT) too: training "
                                    "finishes the optimizer step in progress and checkpoints it, generation and "
                                    "scoring keep their finished rows; a second signal exits at once "
                                    "(docs/preemption.md). Names among SIGTERM, SIGUSR1, SIGUSR2, SIGHUP, SIGQUIT, "
                                    "SIGXCPU; [] = Ctrl-C only.")
    preempt_grace_s: float = _f(0.0, "Seconds after the first preemption signal at which spinlm exits at once (exit "
                                "code 75) wherever it is, stopping a managed generation server first; 0 = no timer "
                                "(the scheduler's SIGKILL bounds the stop). Set it a little below the scheduler's "
                                "grace (SLURM: the --signal lead time; Kubernetes: terminationGracePeriodSeconds).")
    push_to_hub: bool = _f(False, "Upload each model to the Hugging Face Hub repo run.hub_model_id as soon as it is "
                           "evaluated: the SFT model to branch sft, iteration T's to branch iteration-T, and the model "
                           "chosen on validation so far (what RUN/best will be) to main, each with its model card. "
                           "The token comes from the environment variable HF_TOKEN only. RUN/pushed.json records what "
                           "was pushed, so a resumed run pushes nothing twice (docs/publishing.md). Later: `spinlm "
                           "push RUN`.")
    hub_model_id: str | None = _f(None, "With run.push_to_hub: the Hub repo, NAME (under the token's account) or "
                                  "ORG/NAME; created if missing.")
    hub_private_repo: bool = _f(False, "With run.push_to_hub: create the repo private (false: the account's default, "
                                "public unless the organization says otherwise). An existing repo keeps its "
                                "visibility.")


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "The SFT model to start from: a local directory or a Hub id.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the model (and of model.tokenizer's Hub "
                              "id): every stage, the vLLM engine and a managed server load that commit; the commit "
                              "it resolves to is recorded in RUN/run_info.json. Default: main.")
    tokenizer: str | None = _f(None, "Tokenizer directory or Hub id, if not the model's own.")
    chat_template: str | None = _f(
        None, "Jinja chat template (text, or path to a .jinja file) used instead of the tokenizer's."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Weights dtype for generation and scoring: auto, float32, bfloat16, float16. "
        "auto = bfloat16 on a GPU that supports it, else float32.")
    attn_implementation: str = _f("sdpa", "Attention kernel: sdpa, eager, flash_attention_2, ...")
    trust_remote_code: bool = _f(False, "Run code shipped with the model repo. Off unless you trust it.")


@dataclass
class DataConfig:
    train: str = _f("", "Training data: a .jsonl/.json/.parquet file or a Hub dataset id.")
    train_split: str = _f("train", "Split to use when `train` is a Hub dataset id.")
    train_subset: str | None = _f(None, "Subset (the dataset card's config_name) of `train` when it is a Hub "
                                  "dataset id; default: the card's default subset.")
    train_revision: str | None = _f(None, "Hub revision (branch, tag or commit) of `train` when it is a Hub "
                                    "dataset id (default: main); the commit read is recorded in RUN/run_info.json.")
    val: str | None = _f(None, "Validation data: what SFT early stopping, in-iteration checks (train.eval_every) and "
                         "RUN/best select on (default: a slice of the training rows, data.val_size).")
    val_split: str = _f("validation", "Split to use when `val` is a Hub dataset id.")
    val_subset: str | None = _f(None, "Subset (the dataset card's config_name) of `val` when it is a Hub "
                                "dataset id; default: the card's default subset.")
    val_revision: str | None = _f(None, "Hub revision (branch, tag or commit) of `val` when it is a Hub "
                                  "dataset id (default: main); the commit read is recorded in RUN/run_info.json.")
    val_size: float = _f(0.05, "Without data.val: the share (below 1) or number (1 and up) of training rows split off, "
                         "seeded by run.seed, as validation data (at most data.max_eval_rows; they are not trained "
                         "on); 0 = none, and then nothing is selected (no early stopping, checks or RUN/best).")
    eval: str | None = _f(None, "Held-out data for the reported metrics (same formats as `train`); never selected "
                          "on.")
    eval_split: str = _f("test", "Split to use when `eval` is a Hub dataset id.")
    eval_subset: str | None = _f(None, "Subset (the dataset card's config_name) of `eval` when it is a Hub "
                                 "dataset id; default: the card's default subset.")
    eval_revision: str | None = _f(None, "Hub revision (branch, tag or commit) of `eval` when it is a Hub "
                                   "dataset id (default: main); the commit read is recorded in RUN/run_info.json.")
    format: Literal["auto", "spin", "messages", "trl", "prompt_response", "alpaca"] = _f(
        "auto", "Input format: auto, spin, messages, trl, prompt_response, alpaca.")
    turn: Literal["first", "last"] = _f(
        "first", "Which assistant turn is the real response: first (the paper) or last.")
    max_train_rows: int | None = _f(None, "Use only the first N training rows (after dedupe).")
    max_eval_rows: int | None = _f(200, "Use only the first N held-out rows.")
    max_prompt_length: int = _f(512, "Longest prompt, in tokens.")
    max_length: int = _f(1024, "Longest prompt + response, in tokens; longer responses are cut.")
    prompt_overflow: Literal["truncate", "drop"] = _f(
        "truncate", "Prompts over max_prompt_length: truncate (keep the end, behind the prompt's BOS) or drop.")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(256, "Most tokens generated per response.")
    temperature: float = _f(1.0, "Sampling temperature (the paper: 1.0).")
    top_p: float = _f(1.0, "Nucleus sampling threshold (the paper: 1.0).")
    top_k: int = _f(0, "Sample from the k most likely tokens only; 0 = off.")
    batch_size: int = _f(64, "Most prompts per generation batch (batches are sorted by prompt length).")
    batch_tokens: int = _f(16384, "Token budget of a generation batch: rows x (longest prompt + max_new_tokens).")
    backend: Literal["local", "server", "vllm"] = _f(
        "local", "local (transformers generate in this process), server (an OpenAI-compatible "
        "/v1/completions server: vLLM, SGLang, TGI, transformers serve; needs "
        "`pip install 'spinlm[server]'`) or vllm (a vLLM engine in this process; needs vLLM installed).")
    server_url: str | None = _f(None, "backend server, unmanaged: base URL of a running server, e.g. "
                                "http://127.0.0.1:8000 (a trailing /v1 is fine); "
                                "it must serve the model being generated with.")
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
    vllm_layout: Literal["data", "tensor"] = _f(
        "data", "backend vllm, several processes (torchrun): data = each process runs an engine of "
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
    loss_type: Literal["sigmoid", "hinge"] = _f(
        "sigmoid", "sigmoid (the paper's logistic loss) or hinge (objective spin only).")
    objective: Literal["spin", "space", "sppo_hard", "tspin"] = _f(
        "spin", "The objective: spin (the paper's, with loss_type), space (noise-contrastive, "
        "SPACE 2025: real and generated responses get absolute targets), sppo_hard (SPPO's squared "
        "loss, log-ratios pinned to +-1/(2 beta)) or tspin (T-SPIN 2025: triplets with the starting "
        "model's response kept from iteration 0; reference-free). spinlm/loss.py has the formulas.")
    space_mu: float = _f(1.0, "objective space: the noise ratio mu (generated responses per real one; 1 recommended).")
    tspin_alpha: float = _f(1.0, "objective tspin: alpha, the scale of both log-prob gaps (used in spin.beta's place).")
    tspin_history_weight: float = _f(0.1, "objective tspin: the paper's beta, the weight of the historical term "
                                     "over the triplets whose y' is not y0 (0 at iteration 0, where y' and y0 come "
                                     "from the same model).")
    sft_weight: float = _f(0.0, "Add sft_weight x the real response's NLL per token to each pair's loss (a "
                           "regulariser, TRL's rpo_alpha); 0 = the paper's loss.")
    drop_dead_pairs: bool = _f(False, "Leave out of training the pairs whose generated response equals the real one "
                               "(they carry no SPIN gradient; they are counted in the logs either way).")


@dataclass
class TrainConfig:
    learning_rate: float | list[float] = _f(5e-7, "Peak learning rate: one value, or one per iteration.")
    optimizer: Literal["rmsprop", "adamw"] = _f(
        "rmsprop", "rmsprop (the paper's) or adamw.")
    weight_decay: float = _f(0.0, "Weight decay.")
    epochs: int = _f(2, "Epochs over the iteration's pairs.")
    max_steps: int | None = _f(None, "Stop an iteration after this many optimizer steps.")
    schedule_epochs: int | None = _f(None, "Length, in epochs, of the learning-rate schedule (warm-up share and linear "
                                     "decay to 0 are computed over it); null = the steps run (train.epochs, or "
                                     "train.max_steps if fewer). Set above train.epochs to stop partway down a "
                                     "longer schedule, as the released SPIN scripts did (a 6-epoch schedule, "
                                     "stopped early: uclaml/SPIN issues #12, #36). At least train.epochs.")
    batch_size: int = _f(8, "Pairs per micro-batch (per process).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = _f(0.1, "Share of the steps spent warming the learning rate up linearly.")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this; 0 = no clipping.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f(
        "auto", "auto (bf16 on a GPU that supports it), no, bf16, fp16.")
    strategy: Literal["ddp", "fsdp", "zero3"] = _f(
        "ddp", "How training (SFT, SPIN, DPO) spreads over the processes of `torchrun ... -m spinlm`: "
        "ddp (each holds the whole model, gradients and optimizer state) or fsdp (FSDP2: each holds "
        "1/N of them, weights gathered a layer at a time; bf16 compute on a GPU with "
        "mixed_precision auto/bf16) or zero3 (DeepSpeed ZeRO-3, `pip install 'spinlm[deepspeed]'`: "
        "each holds 1/N of them, fp32 partitions, bf16 compute on a GPU with mixed_precision auto/bf16). "
        "docs/scaling.md has the memory sums.")
    fsdp_cpu_offload: bool = _f(False, "strategy fsdp: keep the sharded weights, gradients and optimizer state in CPU "
                                "memory (the optimizer steps on the CPU): for a model that does not fit otherwise, "
                                "at the cost of speed.")
    fsdp_inference: bool = _f(False, "strategy fsdp: the score and evaluate stages (and `spinlm score` / `evaluate`) "
                              "shard the model over the processes too, so none holds it whole (for a model that "
                              "does not fit one device; slower: every forward gathers each layer, and evaluation's "
                              "greedy generation runs every example on every process). Generation is not sharded: "
                              "use generation.backend server or vllm.")
    zero3_offload_optimizer: bool = _f(False, "strategy zero3: keep the fp32 master partitions and optimizer state "
                                       "in CPU memory and step the optimizer there (DeepSpeed's offload_optimizer, "
                                       "device cpu; an accelerate launch's offload_optimizer_device must agree).")
    zero3_offload_params: bool = _f(False, "strategy zero3: keep the weight partitions in CPU memory between uses "
                                    "(DeepSpeed's offload_param, device cpu; an accelerate launch's "
                                    "offload_param_device must agree). Slower; for a model that does not fit "
                                    "otherwise.")
    zero3_param_persistence_threshold: int = _f(
        100000, "strategy zero3: a parameter of at most this many values stays whole on every process instead of "
        "partitioned (DeepSpeed's stage3_param_persistence_threshold, default 1e5): no all-gather for small tensors "
        "(norms, biases) at the cost of their memory on every process; 0 partitions every parameter. The log says "
        "how many were partitioned.")
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
    disable_dropout: bool = _f(True, "Turn the policy's dropout off in SPIN/DPO training "
                               "(TRL's default): the reference "
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
    score_max_tokens: int = _f(2048, "Most tokens (padding included) in one forward of the score stage and of "
                               "held-out scoring: rows of packing.max_tokens, as many per forward as fit (without "
                               "gradients nothing is kept for a backward). Larger forwards can keep a big GPU busier; "
                               "on CPU, forwards beyond about 2048 tokens outgrow the caches and run slower "
                               "(BENCHMARKS.md).")
    backward_per_row: bool = _f(True, "In training (SPIN, DPO and SFT stages), run forward and backward one packed "
                                "row at a time (gradients "
                                "add up to the same step), so activations of one row, not of the whole "
                                "micro-batch, are held at once.")
    chunk_logits: Literal["auto", "always", "never"] = _f(
        "auto", "Compute the output layer and log-softmax on packed rows a chunk of positions at a time, recomputed "
        "in backward, so no (positions x vocabulary) logits tensor is held (a 152k-262k vocabulary at 2-8k tokens "
        "makes it gigabytes): auto = only when a forward's logits would exceed packing.logits_chunk_mb, always, "
        "never. Checked against the plain computation once per model, like packing; models that soft-cap or scale "
        "their logits (Gemma-2, Cohere, Granite) or whose output layer is not a plain Linear are never chunked.")
    logits_chunk_mb: float = _f(256.0, "Size of one chunk of float32 logits in MB (positions per chunk = MB / (4 x "
                                "vocabulary)); with chunk_logits auto, also the size above which a forward chunks.")


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
    batch_size: int = _f(32, "Batch size for held-out generation, and for scoring on the plain path (packed "
                         "scoring fills forwards of packing.score_max_tokens tokens); the score stage keeps its "
                         "results every 16 x eval.batch_size prompts (a prompt's rows of a mix window together).")
    continued_sft: bool = _f(False, "Also train the baseline the paper compares with: the start model fine-tuned "
                             "further on the real responses (sft.learning_rate, no early stopping) for as many "
                             "optimizer steps of train.batch_size examples as all SPIN iterations took, selected "
                             "as SPIN is: with train.eval_every, checked on the validation data at the steps SPIN "
                             "checked, by the same metric, its best checked weights kept; it is evaluated and "
                             "listed as continued-sft (never chosen as RUN/best).")


# FastChat's fastchat/llm_judge/common.py, `temperature_config` and `NEED_REF_CATS` (read 2026-12-07).
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
MT_BENCH_REFERENCE_CATEGORIES = ["math", "reasoning", "coding", "arena-hard-200"]


@dataclass
class JudgeConfig:
    """`spinlm judge --judge-prompts FILE` (MT-Bench as FastChat's llm_judge runs it; docs/evaluation.md)."""

    max_new_tokens: int = _f(1024, "MT-Bench: most tokens per answer turn (FastChat gen_model_answer.py's "
                             "--max-new-token default); the prompt is never cut.")
    temperatures: dict[str, float] = _f(MT_BENCH_TEMPERATURES, "MT-Bench: the answers' sampling temperature per "
                                        "question category (FastChat common.py temperature_config); 0 = greedy. "
                                        "A value given replaces the whole mapping.")
    default_temperature: float = _f(0.7, "MT-Bench: the temperature of a category not in judge.temperatures "
                                    "(FastChat's 0.7).")
    top_k: int = _f(50, "MT-Bench: top-k of the sampled answers (FastChat passes none to generate, so "
                    "transformers 4.x's default 50 applied); 0 = off.")
    reference_categories: list[str] = _f(MT_BENCH_REFERENCE_CATEGORIES, "MT-Bench: categories judged against a "
                                         "reference answer with the *-math-v1 prompts (FastChat common.py "
                                         "NEED_REF_CATS).")


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
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def per_iteration(self, name: str, t: int) -> float:
        """lr or beta for iteration t (a scalar, or the t-th entry of a list)."""
        value = self.train.learning_rate if name == "learning_rate" else self.spin.beta
        return float(value[t] if isinstance(value, list) else value)

    def to_dict(self) -> dict[str, Any]:
        """Every section as nested plain dicts (what to_yaml writes)."""
        return dataclasses.asdict(self)



SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}

# validate() has always reported bad choices with generation's before data's: the derived CHOICES keep
# that order so its message stays the same (a section not listed here sorts last).
_CHOICE_ORDER = ("model", "generation", "data", "spin", "train")


def _choices() -> dict[tuple[str, str], tuple[str, ...]]:
    """(section, key) -> allowed values, for every field annotated Literal[...]."""
    found = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if typing.get_origin(hints[f.name]) is Literal:
                found[section, f.name] = typing.get_args(hints[f.name])
    rank = {s: i for i, s in enumerate(_CHOICE_ORDER)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0][0], len(rank))))


CHOICES = _choices()
PLANNED: dict[tuple[str, str, str], str] = {}  # (section, key, value) -> why a value to come is refused for now

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")


def trackers(run: RunConfig) -> list[str]:
    """run.report_to as a list of tracker names ('none' and [] are none; a name alone is a list of one)."""
    names = [run.report_to] if isinstance(run.report_to, str) else list(run.report_to)
    return list(dict.fromkeys(n for n in names if n not in ("none", "")))
