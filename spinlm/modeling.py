"""Loading and saving models and tokenizers (safetensors only, remote code off by default)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from spinlm.config import ModelConfig
from spinlm.errors import UserError
from spinlm.hub import model_commit
from spinlm.tokens import set_chat_template

log = logging.getLogger("spinlm")


def quiet_transformers() -> None:
    """transformers' own bars (weights loading/saving) only add noise to our stage logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def use_deterministic(on: bool) -> None:
    """run.deterministic: deterministic kernels only (CUDA needs the cuBLAS workspace setting)."""
    if on:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def device() -> torch.device:
    """This process's device (its own GPU under torchrun / accelerate launch)."""
    from spinlm.dist import state

    return state().device


def release_device_memory() -> None:
    """Collect dropped objects and hand cached GPU memory back to the device (for a generation
    engine or server that needs it: an idle process's cache would otherwise keep it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def inference_dtype(name: str) -> torch.dtype:
    """auto: bf16 where the GPU supports it, else fp32 (bf16 matmul is ~400x slower on CPU)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_local(path: str) -> None:
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"{path}: no such model directory")
    if p.is_dir() and not any(p.glob("*.safetensors")):
        pickled = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = (f" (found {', '.join(pickled)}: pickle files, which can run code when loaded; convert them with "
                 "model.save_pretrained(dir, safe_serialization=True) where you trust them)") if pickled else ""
        raise UserError(f"{path}: no model weights (*.safetensors) in this directory; "
                        f"spinlm loads safetensors only{found}")


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or path
    if not cfg.tokenizer:
        model_commit(path, cfg.revision)  # an unknown Hub id or revision: say what exists
    if cfg.trust_remote_code:
        log.warning("trust_remote_code is on: code from %s will run on this machine", source)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: could not load the tokenizer: {e}") from None
    set_chat_template(tok, cfg.chat_template, source)
    if tok.eos_token_id is None:
        raise UserError(f"{source}: the tokenizer has no EOS token; responses must end with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are masked out everywhere
    return tok


def load_model(path: str, cfg: ModelConfig, dtype: torch.dtype | None = None, dev: torch.device | None = None):
    """A causal LM from a directory or Hub id, on `dev` (default: the GPU if there is one)."""
    return read_model(path, cfg, dtype).to(dev or device())


def read_model(path: str, cfg: ModelConfig, dtype: torch.dtype | None = None):
    """A causal LM from a directory or Hub id, where transformers puts it (the CPU; under a live
    DeepSpeed ZeRO-3 config, partitioned over the processes as it is built)."""
    from transformers import AutoModelForCausalLM

    check_local(path)
    model_commit(path, cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=dtype or inference_dtype(cfg.dtype),
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not load the model: {e}") from None
    return model


def empty_model(path: str, cfg: ModelConfig, dtype: torch.dtype | None = None):
    """The model of `path` with every tensor on the meta device: its modules, config and generation
    config as read_model gives them, no memory for the weights, no weight file read (a sharded
    strategy fills the shards from the process that read them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    check_local(path)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or inference_dtype(cfg.dtype),
                                                     attn_implementation=cfg.attn_implementation,
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not load the model: {e}") from None
    try:  # from_pretrained reads it too; without one, both keep the one made from config.json
        model.generation_config = GenerationConfig.from_pretrained(path, revision=cfg.revision)
    except OSError:
        pass
    return model


def save(model, tokenizer, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
