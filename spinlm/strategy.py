"""How the training stages spread a model over processes: the one place that decides it.

    torchrun --nproc_per_node 8 -m spinlm run CONFIG.yaml --train.strategy=fsdp

Every training stage (SFT, continued SFT, SPIN train, `spinlm dpo`) asks its strategy the same
questions: wrap the model and build its optimizer, keep gradients local on all but the last
micro-batch, backward, clip, sum over processes, save the model, save and load a checkpoint.

- `ddp` (default): every process holds the whole fp32 model, its gradients and optimizer
  state; accelerate wraps it in DistributedDataParallel (in one process: the plain model).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer, then on the whole
  model, over all processes (gloo on CPU, NCCL on GPU). Each process holds 1/world of the fp32
  weights, gradients and optimizer state and gathers one layer's weights at a time; on a GPU
  with bf16 (train.mixed_precision auto or bf16) the layers compute in bf16 and gradients are
  reduced in fp32. accelerate is not asked: it never selects FSDP on a CPU.

Saved models are plain transformers directories either way (under fsdp the full state dict is
gathered to rank 0's CPU memory, and rank 0 writes); fsdp checkpoints are sharded
(torch.distributed.checkpoint: one file per process, never the whole model on one rank).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.distributed as torch_dist

from . import checkpoint
from .errors import UserError
from .lora import merged
from .modeling import save as save_pretrained

log = logging.getLogger("spinlm")


def make_strategy(train_cfg):
    """The strategy train.strategy names (validated: ddp or fsdp), checked against the launch."""
    check_launch(train_cfg)
    if train_cfg.strategy == "fsdp":
        return FSDP(train_cfg.mixed_precision, train_cfg.fsdp_cpu_offload)
    return DDP(train_cfg.mixed_precision)


def inference_model(model_path: str, cfg):
    """(model in eval mode, sharded?) for the score and evaluate stages: the whole model on this
    process's device, or, with train.strategy fsdp and train.fsdp_inference, sharded over the
    processes as in training (no process holds it whole; every forward gathers each layer)."""
    from .modeling import load_model

    if cfg.train.strategy == "fsdp" and cfg.train.fsdp_inference:
        fsdp = FSDP(cfg.train.mixed_precision, cfg.train.fsdp_cpu_offload)
        model = fsdp.shard(load_model(model_path, cfg.model, dev=torch.device("cpu"))).eval()
        if fsdp.is_main:
            log.info("%s: sharded over %d processes for scoring / evaluation (train.fsdp_inference)", model_path,
                     fsdp.world)
        return model, fsdp
    return load_model(model_path, cfg.model).eval(), None


def check_launch(train_cfg, env=None) -> None:
    """`accelerate launch` with distributed_type FSDP sets ACCELERATE_USE_FSDP (and FSDP_* for its
    fsdp_config) in every process. spinlm shards with train.strategy, not with accelerate's plugin, so
    a launch that asks for FSDP must agree with the run's config: a mismatch is the user's to fix
    (configs/accelerate/ has launch files that agree), never a silent DDP run or a doubly wrapped model."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return
    launch = "accelerate launch with distributed_type FSDP"
    if train_cfg.strategy != "fsdp":
        raise UserError(f"{launch}, but train.strategy is {train_cfg.strategy}: spinlm shards only when the run's "
                        "config says train.strategy: fsdp (set it, or launch with configs/accelerate/ddp.yaml)")
    if env.get("FSDP_VERSION", "2") != "2":
        raise UserError(f"{launch} and fsdp_version {env['FSDP_VERSION']}: spinlm shards with FSDP2 "
                        "(fully_shard); set fsdp_version: 2 in the accelerate config")
    offload = env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("1", "true")
    if offload != bool(train_cfg.fsdp_cpu_offload):
        raise UserError(f"{launch} and fsdp_offload_params {str(offload).lower()}, but train.fsdp_cpu_offload is "
                        f"{str(bool(train_cfg.fsdp_cpu_offload)).lower()}: set both the same (spinlm reads "
                        "train.fsdp_cpu_offload)")


def resolve_mixed_precision(name: str) -> str:
    """auto: bf16 on a GPU that supports it, else no (fp32)."""
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


class DDP:
    """accelerate's Accelerator: DDP under torchrun, the plain model in one process; bf16
    autocast on a GPU that supports it (fp32 master weights)."""

    name = "ddp"

    def __init__(self, mixed_precision: str):
        from accelerate import Accelerator

        # cpu=True on CPU-only machines, or torchrun's processes do not join one gloo group
        self.accelerator = Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision),
                                       cpu=not torch.cuda.is_available())
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.load_device = self.device
        self.schedule_factor = self.world  # a prepared scheduler steps once per process per optimizer step

    def setup(self, model, build, resume: Path | None):
        """(model, optimizer, scheduler, the checkpoint's trainer state or None): `build(model)`
        gives the optimizer and scheduler; `resume` is a checkpoint to restore first."""
        optimizer, scheduler = build(model)
        state = _resume(checkpoint.load, resume, model, optimizer, scheduler)
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        return model, optimizer, scheduler, state

    def sync(self, model, last: bool):
        """Gradients of all micro-batches add up; DDP all-reduces once, after the last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def forwards(self, n: int) -> int:
        return n  # no collective inside a forward: each process runs its own count

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum").cpu()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def save_model(self, model, tokenizer, out: Path, weights: Path | None = None) -> None:
        """`out`: a plain transformers directory (a LoRA adapter merged in), written by rank 0;
        with `weights`, those saved weights (a best model kept earlier) instead of the current ones."""
        plain = self.unwrap(model)
        if weights is not None:
            from safetensors.torch import load_model

            load_model(plain, str(weights))
        if self.is_main:
            save_pretrained(merged(plain), tokenizer, out)

    def save_weights(self, model, path: Path) -> None:
        """The current weights as one safetensors file, written by rank 0."""
        if self.is_main:
            from safetensors.torch import save_model

            save_model(self.unwrap(model), str(path))

    def save_checkpoint(self, directory: Path, step: int, model, optimizer, scheduler, state: dict) -> None:
        if self.is_main:
            checkpoint.save(directory, step, self.unwrap(model), optimizer, scheduler, state)
        self.barrier()


class FSDP:
    """FSDP2 over every process of the torchrun group (see the module docstring)."""

    name = "fsdp"

    def __init__(self, mixed_precision: str, cpu_offload: bool):
        from . import dist

        self.process = dist.state()  # joins torchrun's group: gloo on CPU, NCCL on GPU
        self.world, self.rank, self.is_main = self.process.num_processes, self.process.process_index, \
            self.process.is_main_process
        self.device = self.process.device
        self.load_device = torch.device("cpu")  # fully_shard moves each process's shard to its device
        self.schedule_factor = 1
        self.bf16 = resolve_mixed_precision(mixed_precision) == "bf16" and torch.cuda.is_available()
        self.cpu_offload = cpu_offload
        self.aliases: set[str] = set()  # tied names, known once the model is sharded

    def _group(self):
        if not torch_dist.is_initialized():  # one process (no torchrun): a group of one
            torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                          store=torch_dist.HashStore(), rank=0, world_size=1)
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world,))

    def shard(self, model):
        """fully_shard on each decoder layer, then the root (embeddings, final norm, output head)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                                         reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        options = dict(mesh=self._group(), mp_policy=precision, offload_policy=offload)
        self.aliases = _aliases(model)
        for layer in _decoder_layers(model):
            fully_shard(layer, **options)
        fully_shard(model, **options)
        return model

    def setup(self, model, build, resume: Path | None):
        model = self.shard(model)
        optimizer, scheduler = build(model)  # after sharding: it steps the shards
        state = _resume(checkpoint.load_sharded, resume, model, optimizer, scheduler)
        return model, optimizer, scheduler, state

    def sync(self, model, last: bool):
        """Every backward reduce-scatters its gradients, so they stay sharded (1/world each) while
        they add up: skipping the sync would hold the whole model's unsharded fp32 gradients on every
        process (28 GB for 7B) until the last micro-batch, at one reduce-scatter per backward saved."""
        return contextlib.nullcontext()

    def forwards(self, n: int) -> int:
        """Every process must run as many forwards (each one gathers the weights layer by layer):
        the most any process has."""
        count = torch.tensor([n], device=self.device)  # NCCL reduces device tensors only
        torch_dist.all_reduce(count, op=torch_dist.ReduceOp.MAX)
        return int(count.item())

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        torch_dist.all_reduce(tensor)
        return tensor.cpu()

    def barrier(self) -> None:
        self.process.wait_for_everyone()

    def unwrap(self, model):
        return model  # the sharded model is still the transformers class (a subclass fully_shard made)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Every process takes part; rank 0 gets the full weights in CPU memory (tied names once,
        as save_pretrained writes them), the others {}."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if k not in self.aliases}

    def save_model(self, model, tokenizer, out: Path, weights: Path | None = None) -> None:
        if weights is not None:
            from safetensors.torch import load_file

            full = load_file(str(weights)) if self.is_main else {}
        else:
            full = self.full_state_dict(model)
        if self.is_main:
            model.save_pretrained(out, state_dict=full, safe_serialization=True)
            tokenizer.save_pretrained(out)
        self.barrier()

    def save_weights(self, model, path: Path) -> None:
        from safetensors.torch import save_file

        full = self.full_state_dict(model)
        if self.is_main:
            save_file({k: v.contiguous() for k, v in full.items()}, str(path), metadata={"format": "pt"})
        self.barrier()

    def save_checkpoint(self, directory: Path, step: int, model, optimizer, scheduler, state: dict) -> None:
        checkpoint.save_sharded(directory, step, model, optimizer, scheduler, state, self)


def _resume(load, path: Path | None, model, optimizer, scheduler) -> dict | None:
    """The trainer state of checkpoint `path` (None: no checkpoint), restored by `load`; the learning
    rate stays the one configured now (a --force resume may have changed it)."""
    if path is None:
        return None
    configured = list(scheduler.base_lrs)
    state = load(path, model, optimizer, scheduler)
    scheduler.base_lrs = configured
    return state


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM: the ModuleList with the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise AssertionError(f"{type(model).__name__}: no decoder layers (a ModuleList) found to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def _aliases(model) -> set[str]:
    """Names under which an already named parameter appears again (tied output head): left out of
    a saved state dict, as save_pretrained does."""
    seen, aliases = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.setdefault(id(p), name)
    return aliases
