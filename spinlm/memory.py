"""Per-device memory of a planned run, estimated before anything loads (`spinlm validate`).

The sums are docs/scaling.md's, per process:
- training: fp32 master weights (4 bytes per parameter), fp32 gradients of what trains (4), and the
  optimizer state (RMSprop 4, AdamW 8); fsdp and zero3 divide all three by the number of processes,
  and with train.fsdp_cpu_offload they live in host memory (under zero3: the gradients and optimizer
  state with train.zero3_offload_optimizer, the weights with train.zero3_offload_params). A LoRA
  adapter trains few parameters: its gradients and state are not counted, its frozen fp32 base is.
  fsdp / zero3 also gather one decoder layer at a time (weights and, in the backward, its gradients:
  6 bytes per parameter of a layer in bf16, 12 in fp32).
- activations of the largest packed row (`packing.backward_per_row`; else of a whole micro-batch):
  about 34 x tokens x hidden bytes per layer in bf16 (Korthikanti et al. 2022; attention scores not
  kept by sdpa / flash attention), doubled in fp32; with gradient checkpointing 2 x tokens x hidden
  per layer plus one layer's full set. The logits: tokens x vocab in fp32, three times (logits,
  log-softmax, their gradient).
- generation and scoring: the whole model in model.dtype, plus, for local generation, the KV cache
  of one generation batch; with train.fsdp_inference (and generation on a server or vLLM engine,
  whose memory is its own) scoring holds 1/N of the weights and one gathered layer.
These are estimates, within tens of percent: the framework's own buffers, the allocator's
fragmentation and temporary copies are not counted, so a plan must fit 92% of the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from spinlm.errors import UserError
from spinlm.generation import backend_for
from spinlm.loss import objective

GIB = 2**30


def processes(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def size(n: float) -> str:
    """Bytes as GiB, or MiB below 0.1 GiB."""
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"
OPTIMIZER_BYTES = {"rmsprop": 4, "adamw": 8}
USABLE = 0.92  # of a device's memory: the rest for the CUDA context, the allocator's fragmentation, buffers


@dataclass
class Arch:
    parameters: int
    layers: int
    hidden: int
    vocab: int
    kv_width: int  # key/value heads x head size


def arch_of(model_dir: str, parameters: int, trust_remote_code: bool = False,
            revision: str | None = None) -> Arch | None:
    """The sizes the estimate needs, from the model's config.json (its text config for multimodal ones; a Hub
    model's at `revision`, from the cache offline); None for a config that does not name them the transformers
    way."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: could not read config.json: {e}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
        heads, vocab = int(text.num_attention_heads), int(text.vocab_size)
    except (AttributeError, TypeError):
        return None
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return Arch(parameters, layers, hidden, vocab, kv_heads * head_dim)


def estimate(cfg, arch: Arch, world: int, row_tokens: int, on_gpu: bool) -> dict:
    """Bytes per device of the training stages and of generation / scoring, by part."""
    tc, p = cfg.train, arch.parameters
    sharded = tc.strategy in ("fsdp", "zero3")
    shard = world if sharded else 1
    lora = cfg.peft.enabled
    offload = sharded and tc.fsdp_cpu_offload
    half = on_gpu and tc.mixed_precision in ("auto", "bf16", "fp16")
    train = {
        "weights": 4 * p / shard,
        "gradients": 0 if lora else 4 * p / shard,
        "optimizer": 0 if lora else OPTIMIZER_BYTES[tc.optimizer] * p / shard,
    }
    # the parts held in host memory instead: all three with fsdp's offload; under zero3 the optimizer's
    # offload takes the gradient partitions and optimizer state, the parameters' offload the weights
    moved = set(train) if offload else set()
    if tc.strategy == "zero3":
        moved = {"gradients", "optimizer"} if tc.zero3_offload_optimizer else set()
        moved |= {"weights"} if tc.zero3_offload_params else set()
    host = sum(train[k] for k in moved)
    train = {k: 0.0 if k in moved else v for k, v in train.items()}
    if sharded:
        train["gathered layer"] = (6 if half else 12) * p / arch.layers
    per_layer = 34 * row_tokens * arch.hidden * (1 if half else 2)
    if tc.gradient_checkpointing:
        train["activations"] = 2 * row_tokens * arch.hidden * (1 if half else 2) * arch.layers + per_layer
    else:
        train["activations"] = per_layer * arch.layers
    train["logits"] = 3 * 4 * row_tokens * arch.vocab
    weight_bytes = 4 if not on_gpu or cfg.model.dtype == "float32" else 2
    g = cfg.generation
    if backend_for(cfg).needs_local_model:  # generation holds the whole model, and the KV cache of one batch
        length = cfg.data.max_prompt_length + g.max_new_tokens
        infer = {"weights": weight_bytes * p,
                 "kv cache": 2 * arch.layers * arch.kv_width * weight_bytes * g.batch_size * length}
    elif tc.strategy == "fsdp" and tc.fsdp_inference:  # scoring and evaluation sharded as in training
        infer = {"weights": weight_bytes * p / world, "gathered layer": weight_bytes * p / arch.layers}
    else:
        infer = {"weights": weight_bytes * p}
    return {"train": train, "train_total": sum(train.values()), "infer": infer, "infer_total": sum(infer.values()),
            "host_per_process": host, "world": world, "row_tokens": row_tokens, "strategy": tc.strategy,
            "checkpointing": tc.gradient_checkpointing, "lora": lora, "optimizer": tc.optimizer}


def row_tokens(cfg, prompt_max: int, real_max: int) -> int:
    """Tokens of the largest row one forward and backward holds: a packed row (packing.max_tokens, or
    one longer pair alone) with packing.backward_per_row, else a whole micro-batch of the longest pairs."""
    responses = len(objective(cfg.spin.objective).responses)  # [prompt | real | generated (| historical)]
    pair = prompt_max + real_max + (responses - 1) * cfg.generation.max_new_tokens
    if cfg.packing.enabled and cfg.packing.backward_per_row:
        return max(cfg.packing.max_tokens, pair)
    return pair * cfg.train.batch_size


def check(plan: dict, device_bytes: int | None, device: str) -> None:
    """Refuse a plan that does not fit the device, with the numbers and what would fit."""
    if device_bytes is None:
        return
    need, usable = max(plan["train_total"], plan["infer_total"]), USABLE * device_bytes
    if need <= usable:
        return
    stage = "training" if plan["train_total"] >= plan["infer_total"] else "generation / scoring"
    parts = ", ".join(f"{k} {size(v)}" for k, v in plan["train" if stage == "training" else "infer"].items())
    sharded = plan["strategy"] in ("fsdp", "zero3")
    ways = [("more processes" if sharded else "train.strategy fsdp") + " (weights, gradients and optimizer state "
            "divide by the processes)", {"fsdp": "train.fsdp_cpu_offload: true",
                                     "zero3": "train.zero3_offload_optimizer / zero3_offload_params: true"
                                     }.get(plan["strategy"], ""),
            "" if plan["checkpointing"] else "train.gradient_checkpointing: true",
            "" if plan["lora"] or sharded else "peft.enabled: true (LoRA)", "a smaller packing.max_tokens",
            "train.optimizer rmsprop (4 bytes per parameter less)" if plan["optimizer"] == "adamw" else ""]
    ways = [w for w in ways if w]
    if stage != "training":
        ways = ["model.dtype bfloat16", "generation.backend server or vllm (a tensor-parallel engine)",
                "a smaller generation.batch_size"]
    raise UserError(f"memory: {stage} needs about {size(need)} per device ({parts}; "
                    f"train.strategy {plan['strategy']}, {processes(plan['world'])}, rows of {plan['row_tokens']} "
                    f"tokens), but {device} has {size(device_bytes)} ({size(usable)} usable). "
                    f"Options: {'; '.join(ways)}. "
                    "The estimate is approximate; run.check_memory: false skips this check")


def lines(plan: dict, device_bytes: int | None, device: str) -> list[str]:
    """The report's memory lines."""
    fmt = lambda parts: ", ".join(f"{k} {size(v)}" for k, v in parts.items())
    out = [f"memory per device (estimate; train.strategy {plan['strategy']}, {processes(plan['world'])}, "
           f"rows of {plan['row_tokens']} tokens):",
           f"  training {size(plan['train_total'])} ({fmt(plan['train'])})",
           f"  generation / scoring {size(plan['infer_total'])} ({fmt(plan['infer'])})"]
    if plan["host_per_process"]:
        out.append(f"  offloaded to host memory: {size(plan['host_per_process'])} per process")
    out.append(f"  {device}: {size(device_bytes)}" if device_bytes is not None
               else f"  {device}: no device check")
    return out
