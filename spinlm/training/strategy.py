"""How the training stages spread a model over processes: the one place that decides it.

    torchrun --nproc_per_node 8 -m spinlm run CONFIG.yaml --train.strategy=fsdp

Every training stage (SFT, continued SFT, SPIN train, `spinlm dpo`) asks its strategy the same
questions: load the model, wrap it and build its optimizer, keep gradients local on all but the last
micro-batch, backward, clip, sum over processes, save the model, save and load a checkpoint.

- `ddp` (default): every process holds the whole fp32 model, its gradients and optimizer
  state; accelerate wraps it in DistributedDataParallel (in one process: the plain model).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each decoder layer, then on the whole
  model, over all processes (gloo on CPU, NCCL on GPU). Each process holds 1/world of the fp32
  weights, gradients and optimizer state and gathers one layer's weights at a time; on a GPU
  with bf16 (train.mixed_precision auto or bf16) the layers compute in bf16 and gradients are
  reduced in fp32. accelerate is not asked: it never selects FSDP on a CPU.
- `zero3`: DeepSpeed ZeRO stage 3 (`pip install 'spinlm[deepspeed]'`) over the same group: each
  process holds 1/world of the weights, gradients and optimizer state (fp32 partitions; on a GPU
  with bf16 the model computes in bf16 over fp32 master partitions). spinlm's own optimizer
  (RMSprop/AdamW) is DeepSpeed's client optimizer; spinlm's loop keeps owning gradient
  accumulation (DeepSpeed's gradient_accumulation_steps is 1, `managed_gradient_accumulation`
  off: every micro-batch's backward reduce-scatters and adds into the partitions, and one
  `engine.step()` per optimizer step is the boundary); clipping to train.max_grad_norm happens
  once, inside DeepSpeed's step (spinlm's clip call runs that step and reports its norm).
  With train.zero3_offload_optimizer / zero3_offload_params the optimizer state (and master
  partitions) / the weight partitions live in CPU memory. DeepSpeed is driven directly, not
  through accelerate's plugin (its DeepSpeed path runs the optimizer step inside `backward`, before
  spinlm's guards), also under `accelerate launch` with distributed_type DEEPSPEED: that launch
  only starts the processes, and its settings must agree with the run's config (check_launch).

Loading under fsdp and zero3: rank 0 alone reads the weights (the whole model once per launch,
not once per process); the other processes build the model without memory and receive their
shards from rank 0 (fsdp: torch's set_model_state_dict, broadcast from rank 0; zero3: transformers'
ZeRO-3 path, zero.Init). The values are exactly load_model's.

Saved models are plain transformers directories either way (under fsdp and zero3 the full fp32
state dict is gathered to rank 0's CPU memory, and rank 0 writes); fsdp checkpoints are sharded
(torch.distributed.checkpoint: one file per process, never the whole model on one rank); zero3
checkpoints are DeepSpeed's own (`engine.save_checkpoint`: one optimizer-state file per process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as torch_dist

from spinlm.errors import UserError
from spinlm.modeling import save as save_pretrained
from spinlm.training import checkpoint
from spinlm.training.lora import merged
from spinlm.training.steps import load_trainable, trainable

log = logging.getLogger("spinlm")


def make_strategy(train_cfg):
    """The strategy train.strategy names (validated: ddp, fsdp or zero3), checked against the launch."""
    check_launch(train_cfg)
    if train_cfg.strategy == "fsdp":
        return FSDP(train_cfg.mixed_precision, train_cfg.fsdp_cpu_offload)
    if train_cfg.strategy == "zero3":
        return ZeRO3(train_cfg.mixed_precision, train_cfg.max_grad_norm, train_cfg.batch_size,
                     train_cfg.zero3_offload_optimizer, train_cfg.zero3_offload_params,
                     train_cfg.zero3_param_persistence_threshold)
    return DDP(train_cfg.mixed_precision)


def inference_model(model_path: str, cfg):
    """(model in eval mode, sharded?) for the score and evaluate stages: the whole model on this
    process's device, or, with train.strategy fsdp and train.fsdp_inference, sharded over the
    processes as in training (no process holds it whole; every forward gathers each layer)."""
    from spinlm.modeling import load_model

    if cfg.train.strategy == "fsdp" and cfg.train.fsdp_inference:
        fsdp = FSDP(cfg.train.mixed_precision, cfg.train.fsdp_cpu_offload)
        model = fsdp.load(model_path, cfg.model, dtype=None).eval()  # model.dtype, as load_model
        if fsdp.is_main:
            log.info("%s: sharded over %d processes for scoring / evaluation (train.fsdp_inference)", model_path,
                     fsdp.world)
        return model, fsdp
    return load_model(model_path, cfg.model).eval(), None


def check_launch(train_cfg, env=None) -> None:
    """An `accelerate launch` that shards (distributed_type FSDP or DEEPSPEED) must agree with the run's config.

    accelerate passes the launch file's settings to every process as environment variables
    (ACCELERATE_USE_FSDP and FSDP_*; ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_*,
    ACCELERATE_GRADIENT_CLIPPING, ...; ACCELERATE_MIXED_PRECISION). spinlm shards with its own
    train.strategy, and the run's config is the record of how the run trains (the run directory keeps
    it, a resume compares against it), so a launch never changes a setting silently: each setting the
    launch gives must equal the config's (or be one spinlm takes either way), else every process stops
    with exit 2 naming both values and what spinlm supports. A plain torchrun launch sets none of these."""
    env = os.environ if env is None else env
    if _on(env, "ACCELERATE_USE_DEEPSPEED"):
        _check_deepspeed_launch(train_cfg, env)
    elif _on(env, "ACCELERATE_USE_FSDP"):
        _check_fsdp_launch(train_cfg, env)
    else:
        return
    launch = "accelerate launch with distributed_type " + ("DEEPSPEED" if _on(env, "ACCELERATE_USE_DEEPSPEED")
                                                          else "FSDP")
    asked = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    # 'no' is accelerate's default (every file in configs/accelerate says it): train.mixed_precision decides
    if asked == "no" or (asked == "bf16" and train_cfg.mixed_precision in ("auto", "bf16")):
        return
    fix = ("set train.mixed_precision: bf16 (or auto), or mixed_precision: 'no' in the accelerate config"
           if asked == "bf16" else "spinlm trains in fp32 or bf16: set mixed_precision: bf16 or 'no'")
    raise UserError(f"{launch} and mixed_precision {asked}, but train.mixed_precision is "
                    f"{train_cfg.mixed_precision}: {fix}")


def _on(env, name: str) -> bool:
    return env.get(name, "").lower() in ("1", "true")


def _check_fsdp_launch(train_cfg, env) -> None:
    """distributed_type FSDP: train.strategy fsdp, FSDP2, fsdp_offload_params as train.fsdp_cpu_offload."""
    launch = "accelerate launch with distributed_type FSDP"
    if train_cfg.strategy != "fsdp":
        raise UserError(f"{launch}, but train.strategy is {train_cfg.strategy}: spinlm shards only when the run's "
                        "config says train.strategy: fsdp (set it, or launch with configs/accelerate/ddp.yaml)")
    if env.get("FSDP_VERSION", "2") != "2":
        raise UserError(f"{launch} and fsdp_version {env['FSDP_VERSION']}: spinlm shards with FSDP2 "
                        "(fully_shard); set fsdp_version: 2 in the accelerate config")
    offload = _on(env, "FSDP_OFFLOAD_PARAMS")
    if offload != bool(train_cfg.fsdp_cpu_offload):
        raise UserError(f"{launch} and fsdp_offload_params {str(offload).lower()}, but train.fsdp_cpu_offload is "
                        f"{str(bool(train_cfg.fsdp_cpu_offload)).lower()}: set both the same (spinlm reads "
                        "train.fsdp_cpu_offload)")


def _check_deepspeed_launch(train_cfg, env) -> None:
    """distributed_type DEEPSPEED (the alignment-handbook's deepspeed_zero3.yaml shape): spinlm's zero3
    runs it, with the deepspeed_config keys spinlm can honour; the others exit 2. zero3_init_flag and
    zero3_save_16bit_model are taken either way: spinlm always builds the model partitioned (rank 0
    alone reads the weights) and always saves a plain transformers directory of the gathered fp32
    weights."""
    launch = "accelerate launch with distributed_type DEEPSPEED"
    if train_cfg.strategy != "zero3":
        raise UserError(f"{launch}, but train.strategy is {train_cfg.strategy}: spinlm runs DeepSpeed only when the "
                        "run's config says train.strategy: zero3 (set it, or launch with configs/accelerate/ddp.yaml)")
    if "ACCELERATE_DEEPSPEED_CONFIG_FILE" in env:
        raise UserError(f"{launch} and deepspeed_config_file {env['ACCELERATE_DEEPSPEED_CONFIG_FILE']}: spinlm writes "
                        "DeepSpeed's config itself from the run's config; give zero_stage, offload_optimizer_device, "
                        "offload_param_device and gradient_clipping under deepspeed_config instead")
    if "ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES" in env:
        raise UserError(f"{launch} and deepspeed_moe_layer_cls_names: not supported by spinlm's zero3; remove it")
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if stage != "3":
        raise UserError(f"{launch} and zero_stage {stage}: spinlm's train.strategy zero3 runs ZeRO stage 3 only; set "
                        "zero_stage: 3 (or train.strategy fsdp / ddp with configs/accelerate/fsdp2.yaml / ddp.yaml)")
    for key, field in (("offload_optimizer_device", "zero3_offload_optimizer"),
                       ("offload_param_device", "zero3_offload_params")):
        device = env.get(f"ACCELERATE_DEEPSPEED_{key.upper()}", "none").lower()
        if device not in ("none", "cpu"):
            raise UserError(f"{launch} and {key} {device}: spinlm offloads to the CPU only (none or cpu)")
        if (device == "cpu") != bool(getattr(train_cfg, field)):
            raise UserError(f"{launch} and {key} {device}, but train.{field} is "
                            f"{str(bool(getattr(train_cfg, field))).lower()}: set both the same (spinlm reads "
                            f"train.{field}; true = cpu)")
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clip is not None and _number(clip) != float(train_cfg.max_grad_norm):
        raise UserError(f"{launch} and gradient_clipping {clip}, but train.max_grad_norm is "
                        f"{train_cfg.max_grad_norm}: set both the same (spinlm clips to train.max_grad_norm, inside "
                        "DeepSpeed's step)")
    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if steps != "1":
        raise UserError(f"{launch} and gradient_accumulation_steps {steps}: spinlm accumulates micro-batches itself "
                        "(DeepSpeed's stays 1); set it to 1 and use train.gradient_accumulation_steps "
                        "(sft.gradient_accumulation_steps for SFT)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def resolve_mixed_precision(name: str) -> str:
    """auto: bf16 on a GPU that supports it, else no (fp32)."""
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return name


class DDP:
    """accelerate's Accelerator: DDP under torchrun, the plain model in one process; bf16
    autocast on a GPU that supports it (fp32 master weights)."""

    name = "ddp"
    sharded = False  # every process holds the whole model: each runs its own forwards

    def __init__(self, mixed_precision: str):
        from accelerate import Accelerator

        # cpu=True on CPU-only machines, or torchrun's processes do not join one gloo group
        self.accelerator = Accelerator(mixed_precision=resolve_mixed_precision(mixed_precision),
                                       cpu=not torch.cuda.is_available())
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.schedule_factor = self.world  # a prepared scheduler steps once per process per optimizer step

    def load(self, model_path: str, model_cfg, checkpointing: bool, peft_cfg=None):
        """The fp32 model to train, whole, on this process's device."""
        return load_trainable(model_path, model_cfg, self.device, checkpointing, peft_cfg)

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


class _Sharded:
    """What fsdp and zero3 share: the weights are split over every process of the torchrun group,
    so every forward gathers them from all processes, and the processes run their forwards, sums
    and saves together."""

    sharded = True  # every forward gathers weights from all processes: they run the same forwards together

    def _join(self, mixed_precision: str) -> None:
        """Join torchrun's process group (gloo on CPU, NCCL on GPU)."""
        from spinlm import dist

        self.process = dist.state()
        self.world, self.rank, self.is_main = self.process.num_processes, self.process.process_index, \
            self.process.is_main_process
        self.device = self.process.device
        self.schedule_factor = 1
        self.bf16 = resolve_mixed_precision(mixed_precision) == "bf16" and torch.cuda.is_available()

    def forwards(self, n: int) -> int:
        """Every process must run as many forwards (each one gathers the weights layer by layer):
        the most any process has."""
        return _most(n, self.device)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        torch_dist.all_reduce(tensor)
        return tensor.cpu()

    def barrier(self) -> None:
        self.process.wait_for_everyone()

    def save_model(self, model, tokenizer, out: Path, weights: Path | None = None) -> None:
        """A plain transformers directory written by rank 0 from the gathered full state dict (or from
        `weights`, a file save_weights wrote); every process takes part."""
        if weights is not None:
            from safetensors.torch import load_file

            full = load_file(str(weights)) if self.is_main else {}
        else:
            full = self.full_state_dict(model)
        if self.is_main:
            self.unwrap(model).save_pretrained(out, state_dict=full, safe_serialization=True)
            tokenizer.save_pretrained(out)
        self.barrier()

    def save_weights(self, model, path: Path) -> None:
        """The gathered full state dict as one safetensors file (rank 0)."""
        from safetensors.torch import save_file

        full = self.full_state_dict(model)
        if self.is_main:
            save_file({k: v.contiguous() for k, v in full.items()}, str(path), metadata={"format": "pt"})
        self.barrier()


class FSDP(_Sharded):
    """FSDP2 over every process of the torchrun group (see the module docstring)."""

    name = "fsdp"

    def __init__(self, mixed_precision: str, cpu_offload: bool):
        self._join(mixed_precision)
        self.cpu_offload = cpu_offload
        self.aliases: set[str] = set()  # tied names, known once the model is sharded

    def _group(self):
        _group_of_one()
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world,))

    def load(self, model_path: str, model_cfg, checkpointing: bool = False, peft_cfg=None,
             dtype: torch.dtype | None = torch.float32):
        """The model sharded over the processes, its weights read by rank 0 alone (`dtype` None: model.dtype).

        Rank 0 reads the checkpoint into CPU memory as load_model does; the other processes build the
        same modules on the meta device (no memory). Every process shards its model, gives the shards
        (uninitialised) memory, and takes rank 0's values one tensor at a time: torch's
        set_model_state_dict with broadcast_from_rank0, as accelerate's cpu_ram_efficient_loading does.
        So one process holds the whole model while loading, not every one (a 7B in fp32: 28 GB each)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from spinlm.modeling import empty_model, read_model

        build = read_model if self.is_main else empty_model
        model = trainable(build(model_path, model_cfg, dtype), checkpointing, peft_cfg)
        full = model.state_dict() if self.is_main else {}  # the read weights: they outlive sharding
        # buffers a state dict leaves out (non-persistent: rotary inv_freq), rank 0's values
        computed = {name: buffer.clone() if self.is_main else None for name, buffer in _computed_buffers(model)}
        self.shard(model)
        # memory for every tensor: the shards on the CPU with offload, else on the device; buffers below
        model.to_empty(device=torch.device("cpu") if self.cpu_offload else self.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        for module_name, module in model.named_modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                buffer = buffer.to(self.device)  # to_empty put them with the (offloaded) parameters
                key = f"{module_name}.{name}" if module_name else name
                if key in computed:  # rank 0's, not recomputed: every process holds what load_model gives
                    if self.is_main:
                        buffer.copy_(computed[key])
                    torch_dist.broadcast(buffer, src=0)
                module._buffers[name] = buffer
        return model

    def shard(self, model):
        """fully_shard on each decoder layer, then the root (embeddings, final norm, output head)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                                         reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        options = dict(mesh=self._group(), mp_policy=precision, offload_policy=offload)
        self.aliases = _aliases(model)
        sharded = [fully_shard(layer, **options) for layer in _decoder_layers(model)] + [fully_shard(model, **options)]
        # FSDP2 averages fp32/bf16 gradients with a ReduceOp.AVG reduce-scatter, which gloo (the CPU) sums
        # without a word (torch 2.7 to at least 2.8; pytorch issue 162338): every gradient came out `world`
        # times too large, so clipping, the logged norm and the optimizer's eps all saw the wrong scale.
        # SUM and then FSDP's own division by the group size is right on every backend (on NCCL the cost
        # is one division of each process's gradient shard).
        for module in sharded:  # (torch 2.8's API: the floor)
            module.set_force_sum_reduction_for_comms(True)
        return model

    def setup(self, model, build, resume: Path | None):
        """`model` from load(): already sharded."""
        optimizer, scheduler = build(model)  # after sharding: it steps the shards
        state = _resume(checkpoint.load_sharded, resume, model, optimizer, scheduler)
        return model, optimizer, scheduler, state

    def sync(self, model, last: bool):
        """Every backward reduce-scatters its gradients, so they stay sharded (1/world each) while
        they add up: skipping the sync would hold the whole model's unsharded fp32 gradients on every
        process (28 GB for 7B) until the last micro-batch, at one reduce-scatter per backward saved."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def unwrap(self, model):
        return model  # the sharded model is still the transformers class (a subclass fully_shard made)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Every process takes part; rank 0 gets the full weights in CPU memory (tied names once,
        as save_pretrained writes them), the others {}."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if k not in self.aliases}

    def save_checkpoint(self, directory: Path, step: int, model, optimizer, scheduler, state: dict) -> None:
        checkpoint.save_sharded(directory, step, model, optimizer, scheduler, state, self)


class ZeRO3(_Sharded):
    """DeepSpeed ZeRO stage 3 over every process of the torchrun group (see the module docstring).
    `setup` returns the DeepSpeed engine as the model and a stand-in optimizer: the engine owns the
    step (clip, update, zeroing the gradients); spinlm's scheduler sets the client optimizer's lr."""

    name = "zero3"

    def __init__(self, mixed_precision: str, max_grad_norm: float, batch_size: int, offload_optimizer: bool = False,
                 offload_params: bool = False, persistence_threshold: int = 100000):

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed looks for a CUDA build
        self.deepspeed = import_deepspeed()
        if not torch.cuda.is_available():
            # DeepSpeed's shared-memory all-reduce serves its inference engine only; left as is, its first
            # use on a machine JIT-compiles it (~80 s here) in every training run's startup
            compatible = getattr(self.deepspeed.ops, "__compatible_ops__", None)
            if isinstance(compatible, dict):
                compatible["deepspeed_shm_comm"] = False
        warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                "deprecated", FutureWarning)  # DeepSpeed's calls, once per collective site
        self._join(mixed_precision)  # DeepSpeed wraps torchrun's group
        self.config = {
            "train_micro_batch_size_per_gpu": batch_size,  # bookkeeping only: spinlm feeds the batches
            "gradient_accumulation_steps": 1,  # spinlm accumulates (its own loss scaling) ...
            "managed_gradient_accumulation": False,  # ... and each engine.step() is the boundary
            "gradient_clipping": max_grad_norm if max_grad_norm > 0 else 0.0,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold,
                                  **_offload("offload_optimizer", offload_optimizer),
                                  **_offload("offload_param", offload_params)},
            "bf16": {"enabled": self.bf16},
            "zero_allow_untested_optimizer": True,  # torch's RMSprop / AdamW as the client optimizer ...
            "zero_force_ds_cpu_optimizer": False,  # ... steps the offloaded partitions too (not DeepSpeedCPUAdam)
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.engine = self.stepper = None
        self.aliases: set[str] = set()

    def load(self, model_path: str, model_cfg, checkpointing: bool, peft_cfg=None):
        """The fp32 model partitioned over the processes as it is built, its weights read by rank 0 alone.

        While a transformers HfDeepSpeedConfig of this strategy's config lives, from_pretrained builds
        the model under DeepSpeed's zero.Init (each process allocates only its partitions) and rank 0
        alone reads the checkpoint: each module's partitions are gathered, rank 0 copies its values in,
        and they are partitioned again from rank 0's (the other processes read only the files' headers).
        Dropped once loaded: other models of the run (reference scoring, generation) load whole."""
        from transformers.integrations import HfDeepSpeedConfig

        from spinlm.modeling import read_model

        if not torch_dist.is_initialized():  # no torchrun: a group of one, and the variable DeepSpeed asks for
            _group_of_one()
            os.environ.setdefault("LOCAL_RANK", "0")
        partitioned = HfDeepSpeedConfig(self.config)  # noqa: F841 (transformers holds a weak reference to it)
        try:
            model = read_model(model_path, model_cfg, torch.float32)
        finally:
            del partitioned
        return trainable(model, checkpointing, peft_cfg)

    def setup(self, model, build, resume: Path | None):
        """`model` from load(): already partitioned."""
        self.aliases = _aliases(model)
        optimizer, scheduler = build(model)  # spinlm's scheduler drives the client optimizer's lr
        self.engine, *_ = self.deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        params = list(model.parameters())
        whole = [p for p in params if getattr(p, "ds_persist", False)]  # DeepSpeed marks them in initialize
        log.info("zero3: %d of %d parameter tensors partitioned over %d processes; %d tensors of at most %d values "
                 "(train.zero3_param_persistence_threshold) stay whole on every process",
                 len(params) - len(whole), len(params), self.world, len(whole),
                 self.config["zero_optimization"]["stage3_param_persistence_threshold"])
        self.stepper = _EngineStep(self.engine)
        state = _resume(checkpoint.load_zero3, resume, self.engine, self.stepper, scheduler)
        if resume is not None:  # the lr of the step the checkpoint was written after
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        return self.engine, self.stepper, scheduler, state

    def sync(self, model, last: bool):
        """Every backward reduce-scatters its gradients into the partitions (as fsdp)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # gradient_accumulation_steps 1: not rescaled

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """Runs DeepSpeed's step (clipping to train.max_grad_norm, which its config holds) and
        returns the gradient norm before clipping; the optimizer's step() is then a no-op."""
        self.stepper.step()
        return torch.tensor(float(model.get_global_grad_norm()))

    def unwrap(self, model):
        return getattr(model, "module", model)  # the transformers model (its weights partitioned)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Every process takes part, one weight at a time; rank 0 gets the full fp32 weights in CPU
        memory (tied names once), the others {}."""
        from deepspeed.utils import safe_get_full_fp32_param

        plain = self.unwrap(model)
        params = dict(plain.named_parameters())
        full = {}
        for name, value in plain.state_dict().items():
            if name in self.aliases:
                continue
            if name in params:
                value = safe_get_full_fp32_param(params[name])  # a collective
            if self.is_main:
                full[name] = value.detach().cpu().clone()
        return full

    def save_checkpoint(self, directory: Path, step: int, model, optimizer, scheduler, state: dict) -> None:
        checkpoint.save_zero3(directory, step, model, scheduler, state, self)


class _EngineStep:
    """The optimizer the loops see under zero3: step() runs DeepSpeed's step unless clip_grad_norm
    already did in this optimizer step; zero_grad() is DeepSpeed's (it zeroes in its step)."""

    def __init__(self, engine):
        self.engine, self.stepped = engine, False

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    def step(self) -> None:
        if not self.stepped:
            self.engine.step()
            self.stepped = True

    def zero_grad(self) -> None:
        self.stepped = False


def _offload(key: str, on: bool) -> dict:
    """DeepSpeed's offload entry of ZeRO's config: to the CPU (pinned memory on a GPU machine)."""
    return {key: {"device": "cpu", "pin_memory": torch.cuda.is_available()}} if on else {}


def import_deepspeed():
    """deepspeed, or a UserError saying how to install it."""
    try:
        import deepspeed
    except ImportError as e:
        from spinlm.errors import UserError

        raise UserError("train.strategy zero3 needs DeepSpeed: pip install 'spinlm[deepspeed]' (on a machine "
                        f"without CUDA: DS_BUILD_OPS=0 pip install 'spinlm[deepspeed]'); import failed: {e}") from e
    return deepspeed


def _group_of_one() -> None:
    """One process (no torchrun): a process group of one, so sharded code runs unchanged."""
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                      store=torch_dist.HashStore(), rank=0, world_size=1)


def _most(n: int, device) -> int:
    """The largest `n` of any process."""
    count = torch.tensor([n], device=device)  # NCCL reduces device tensors only
    torch_dist.all_reduce(count, op=torch_dist.ReduceOp.MAX)
    return int(count.item())


def _resume(load, path: Path | None, model, optimizer, scheduler) -> dict | None:
    """The trainer state of checkpoint `path` (None: no checkpoint), restored by `load`; the learning
    rate stays the one configured now (a --force resume may have changed it)."""
    if path is None:
        return None
    configured = list(scheduler.base_lrs)
    state = load(path, model, optimizer, scheduler)
    scheduler.base_lrs = configured
    return state


def _computed_buffers(model):
    """(name, buffer) of the buffers a state dict leaves out (non-persistent: rotary inv_freq)."""
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


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
