"""LoRA training (peft.enabled) on the real tiny Llama: merged plain models, frozen base,
an adapter that starts as the identity, and checkpoints that resume to the same weights."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from spinlm.cli import main
from spinlm.config import Config, build, validate
from spinlm.errors import UserError
from spinlm.training import checkpoint

pytest.importorskip("peft")


def _lora_config(tmp_path: Path, tiny_model: Path, task_data: dict) -> Path:
    cfg = {
        "run": {"dir": str(tmp_path / "run"), "progress": False, "seed": 3},
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(task_data["train"]), "eval": str(task_data["test"]), "max_train_rows": 16,
                 "max_eval_rows": 8, "max_prompt_length": 64, "max_length": 128},
        "sft": {"enabled": False},
        "generation": {"max_new_tokens": 12, "batch_size": 8},
        "spin": {"iterations": 2, "mix_window": 2, "beta": 0.1},
        "train": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 4, "checkpoint_every": 2},
        "peft": {"enabled": True, "r": 4, "alpha": 8},
        "eval": {"checker": "spinlm.demo.task:check_example", "batch_size": 8},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def lora_run(tiny_model, task_data, tmp_path_factory) -> Path:
    """A 2-iteration `spinlm run` with a LoRA adapter; returns the run directory."""
    tmp = tmp_path_factory.mktemp("lora")
    assert main(["run", str(_lora_config(tmp, tiny_model, task_data))]) == 0
    return tmp / "run"


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _groups(tokenizer):
    return [(tokenizer.encode("<|user|>3 + 4<|end|><|assistant|>"), [tokenizer.encode("7<|eos|>"),
                                                                      tokenizer.encode("8 9<|eos|>")]),
            (tokenizer.encode("<|user|>12 + 30<|end|><|assistant|>"), [tokenizer.encode("42<|eos|>"),
                                                                        tokenizer.encode("4<|eos|>")])]


def test_run_saves_merged_plain_models(lora_run, tiny_model):
    from transformers import AutoModelForCausalLM

    start = _weights(tiny_model)
    for t in (0, 1):
        model_dir = lora_run / f"iteration-{t}" / "model"
        weights = _weights(model_dir)
        assert set(weights) == set(start), "merged model must have exactly the base model's keys"
        assert not any("lora" in k or "base_layer" in k for k in weights)
        assert all(w.dtype == torch.float32 for w in weights.values())
        assert any(not torch.equal(weights[k], start[k]) for k in start), f"iteration {t} did not train"
        assert not (model_dir / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(model_dir)  # plain transformers, no peft
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not (lora_run / f"iteration-{t}" / "model.tmp.checkpoints").exists()
    # iteration 1 started from (and was scored under) iteration 0's merged model
    assert any(not torch.equal(a, b) for a, b in zip(_weights(lora_run / "iteration-0" / "model").values(),
                                                     _weights(lora_run / "iteration-1" / "model").values()))


def test_only_adapted_layers_change(lora_run, tiny_model):
    """all-linear adapts the attention and MLP projections, never embeddings, norms or the head."""
    start, trained = _weights(tiny_model), _weights(lora_run / "iteration-0" / "model")
    frozen = [k for k in start if "embed" in k or "norm" in k or "lm_head" in k]
    adapted = [k for k in start if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert frozen and adapted
    for k in frozen:
        assert torch.equal(trained[k], start[k]), k
    for k in adapted:
        assert not torch.equal(trained[k], start[k]), k


def _trainable(path: Path, cfg: Config):
    from spinlm.training.steps import load_trainable

    return load_trainable(str(path), cfg.model, torch.device("cpu"), False, cfg.peft)


def _peft_cfg(**peft) -> Config:
    return build(overrides=[f"--peft.{k}={v}" for k, v in {"enabled": "true", "r": 4, "alpha": 8, **peft}.items()])


def test_adapter_starts_as_the_base_model(tiny_model):
    """LoRA's B starts at zero: step-0 log-probs equal the base model's, packed and plain."""
    from spinlm.modeling import load_tokenizer
    from spinlm.packing import prepare, response_logps
    from spinlm.training.lora import merged

    cfg = _peft_cfg()
    tokenizer = load_tokenizer(str(tiny_model), cfg.model)
    groups, pad = _groups(tokenizer), tokenizer.pad_token_id
    base = _trainable(tiny_model, Config()).eval()
    adapted = _trainable(tiny_model, cfg).eval()
    assert type(adapted).__name__ == "PeftModelForCausalLM"
    layout = prepare(adapted, groups, pad, cfg.packing)
    assert layout.budget == cfg.packing.max_tokens and layout.chunk_logits == "auto"  # the packing probes pass
    with torch.no_grad():
        for how in (layout, replace(layout, chunk_logits="always"), None):
            want = [float(s) for g in response_logps(base, groups, pad, how) for s, _ in g]
            got = [float(s) for g in response_logps(adapted, groups, pad, how) for s, _ in g]
            assert got == pytest.approx(want, abs=1e-6)
        plain = merged(adapted)
        assert type(plain).__name__ == "LlamaForCausalLM"
        got = [float(s) for g in response_logps(plain, groups, pad, None) for s, _ in g]
        assert got == pytest.approx(want, abs=1e-6)


def _step(model, tokenizer, optimizer) -> None:
    from spinlm.packing import Layout, response_logps

    scores = response_logps(model, _groups(tokenizer), tokenizer.pad_token_id, Layout(1024))
    loss = -sum(s for g in scores for s, _ in g)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoint_round_trip_saves_the_adapter_only(tiny_model, tmp_path):
    from spinlm.modeling import load_tokenizer
    from spinlm.training.steps import linear_schedule, make_optimizer

    cfg = _peft_cfg()
    tokenizer = load_tokenizer(str(tiny_model), cfg.model)
    model = _trainable(tiny_model, cfg)
    optimizer = make_optimizer("adamw", model, 1e-2, 0.0)
    scheduler = linear_schedule(optimizer, 10, 0.0)
    _step(model, tokenizer, optimizer)
    scheduler.step()
    path = checkpoint.save(tmp_path / "ckpt", 1, model, optimizer, scheduler, {"step": 1})
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())

    torch.manual_seed(123)  # a different random A: the load must overwrite it
    fresh = _trainable(tiny_model, cfg)
    fresh_optimizer = make_optimizer("adamw", fresh, 1e-2, 0.0)
    fresh_scheduler = linear_schedule(fresh_optimizer, 10, 0.0)
    assert checkpoint.load(path, fresh, fresh_optimizer, fresh_scheduler) == {"step": 1}
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    want_opt, got_opt = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert want_opt.keys() == got_opt.keys()
    for i in want_opt:
        for k in want_opt[i]:
            assert torch.equal(torch.as_tensor(want_opt[i][k]), torch.as_tensor(got_opt[i][k])), (i, k)
    # a further step from both gives the same weights
    _step(model, tokenizer, optimizer)
    _step(fresh, tokenizer, fresh_optimizer)
    want, got = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_full_checkpoint_is_refused_for_an_adapter(tiny_model, tmp_path):
    from spinlm.training.steps import linear_schedule, make_optimizer

    full = _trainable(tiny_model, Config())
    optimizer = make_optimizer("adamw", full, 1e-3, 0.0)
    path = checkpoint.save(tmp_path / "ckpt", 2, full, optimizer,
                           linear_schedule(optimizer, 4, 0.0), {})
    adapted = _trainable(tiny_model, _peft_cfg())
    optimizer = make_optimizer("adamw", adapted, 1e-3, 0.0)
    with pytest.raises(UserError, match="peft.enabled changed"):
        checkpoint.load(path, adapted, optimizer, linear_schedule(optimizer, 4, 0.0))


def test_interrupted_lora_train_resumes_to_the_same_weights(lora_run, tiny_model, tmp_path, monkeypatch):
    """train stops after its step-2 checkpoint (an exception at step 3); a second call resumes
    from it and ends where an uninterrupted run ends."""
    import spinlm.stages.train as train_stage

    pairs = lora_run / "iteration-0" / "pairs.jsonl"  # scored under tiny_model (sft is off)
    cfg = _peft_cfg(dropout=0.1)  # dropout: the resumed run must also restore the RNG
    cfg.run.progress, cfg.train.learning_rate, cfg.train.batch_size = False, 1e-3, 4
    cfg.train.epochs, cfg.train.checkpoint_every = 1, 2
    train_stage.train(str(tiny_model), pairs, tmp_path / "whole", cfg, 0)

    hits = []

    def stop_at_step_3(name: str) -> None:
        hits.append(name)
        if name == "train-step" and len(hits) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_stage, "fault_point", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_stage.train(str(tiny_model), pairs, tmp_path / "cut", cfg, 0)
    assert [p.name for p in (tmp_path / "cut.checkpoints").iterdir()] == ["step-000002"]
    monkeypatch.undo()
    train_stage.train(str(tiny_model), pairs, tmp_path / "cut", cfg, 0)
    want, got = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_peft_config_checks_and_missing_package(monkeypatch):
    cfg = _peft_cfg(r=0, dropout=1.0)
    with pytest.raises(UserError) as e:
        validate(cfg, need=())
    assert "peft.r must be > 0" in str(e.value) and "peft.dropout must be in [0, 1)" in str(e.value)
    assert _peft_cfg(target_modules="[q_proj, v_proj]").peft.target_modules == ["q_proj", "v_proj"]
    assert _peft_cfg().peft.target_modules == "all-linear"

    from spinlm.training.lora import require_peft

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'spinlm\[lora\]'"):
        require_peft()


def test_sft_with_lora_saves_the_best_merged_model(tiny_model, task_data, tmp_path):
    """SFT keeps the best adapter in memory and saves it merged: the saved model's held-out NLL
    is the best one logged, and the frozen weights are the start model's."""
    from spinlm.cli import _examples
    from spinlm.io import read_json
    from spinlm.metrics import heldout_nll
    from spinlm.modeling import load_model, load_tokenizer
    from spinlm.tokens import Limits, encode_real

    out = tmp_path / "sft"
    flags = ["--peft.enabled=true", "--peft.r=4", "--peft.alpha=8", "--sft.epochs=1", "--sft.eval_every=2",
             "--sft.learning_rate=1e-2", "--sft.batch_size=8", "--data.max_length=128",
             "--data.max_prompt_length=64", "--run.progress=false"]
    assert main(["sft", "--model", str(tiny_model), "--data", str(task_data["train"]), "--eval-data",
                 str(task_data["val"]), "--out", str(out), *flags]) == 0
    start, trained = _weights(tiny_model), _weights(out)
    assert set(trained) == set(start)
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"],
                           start["model.layers.0.self_attn.q_proj.weight"])
    best = read_json(out / "spinlm_sft.json")["best_heldout_nll"]
    cfg = build(overrides=flags)
    tokenizer = load_tokenizer(str(out), cfg.model)
    held = encode_real(tokenizer, _examples(cfg, str(task_data["val"]), "eval"), Limits.of(cfg))
    model = load_model(str(out), cfg.model, dtype=torch.float32)
    assert heldout_nll(model, held, tokenizer.pad_token_id, None, 8) == pytest.approx(best, abs=1e-4)


def test_runs_from_before_the_peft_section_resume_without_drift():
    from spinlm.rundir import config_drift

    new = Config().to_dict()
    old = {k: v for k, v in new.items() if k != "peft"}
    assert config_drift(old, new) == []
    assert config_drift(old, _peft_cfg().to_dict()) == ["peft.alpha: None -> 8", "peft.enabled: None -> True",
                                                        "peft.r: None -> 4"]
