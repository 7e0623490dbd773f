"""spinlm.config: precedence, flag parsing, type checks, helpful errors, cross-field validation, safe YAML."""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest

from spinlm import config as C
from spinlm.config import Config, build, merge, parse, parse_overrides, reference, validate
from spinlm.errors import UserError

REQUIRED = ["--model.name_or_path=some/model", "--data.train=train.jsonl"]


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def problems_of(exc: pytest.ExceptionInfo) -> list[str]:
    """The bullet lines of validate's single error."""
    return [line.strip()[2:] for line in str(exc.value).splitlines() if line.strip().startswith("- ")]


# ---------------------------------------------------------------- precedence


def test_defaults():
    cfg = build()
    assert isinstance(cfg, Config)
    assert cfg.train.learning_rate == 5e-7
    assert cfg.spin.beta == 0.1
    assert cfg.spin.loss_type == "sigmoid"
    assert cfg.spin.mix_window == 2
    assert cfg.train.optimizer == "rmsprop"
    assert cfg.model.name_or_path == ""
    assert cfg.data.max_eval_rows == 200


def test_precedence_defaults_base_yaml_flags(tmp_path):
    base = {"train": {"epochs": 5, "batch_size": 4, "optimizer": "adamw"}, "spin": {"iterations": 7}}
    y = write(tmp_path, "train:\n  epochs: 6\n  batch_size: 3\nspin:\n  beta: 0.25\n")
    cfg = build(y, ["--train.epochs=7"], base=base)
    assert cfg.train.epochs == 7              # flag beats YAML beats base
    assert cfg.train.batch_size == 3          # YAML beats base
    assert cfg.train.optimizer == "adamw"     # base beats default
    assert cfg.spin.iterations == 7           # base only
    assert cfg.spin.beta == 0.25              # YAML only
    assert cfg.train.weight_decay == 0.0      # default untouched
    assert cfg.spin.mix_window == 2


def test_each_layer_alone(tmp_path):
    assert build(base={"train": {"epochs": 9}}).train.epochs == 9
    assert build(write(tmp_path, "train: {epochs: 8}\n")).train.epochs == 8
    assert build(overrides=["--train.epochs=4"]).train.epochs == 4
    assert build(base={"train": {"epochs": 9}}, overrides=["--train.epochs", "4"]).train.epochs == 4


def test_builds_do_not_share_state():
    a = build(overrides=["--train.epochs=11", "--spin.beta=[0.1,0.2,0.3]"])
    b = build()
    assert a.train.epochs == 11 and b.train.epochs == 2
    assert b.spin.beta == 0.1
    a.spin.beta.append(0.4)
    assert build(overrides=["--spin.beta=[0.1,0.2,0.3]"]).spin.beta == [0.1, 0.2, 0.3]


def test_empty_yaml_file_is_all_defaults(tmp_path):
    cfg = build(write(tmp_path, "# nothing here\n"))
    assert cfg == Config()


def test_to_yaml_round_trips(tmp_path):
    cfg = build(overrides=["--train.learning_rate=[1e-5,2e-6,3e-7]", "--model.revision=main",
                           "--spin.loss_type=hinge", "--train.max_steps=12", *REQUIRED])
    again = build(write(tmp_path, C.to_yaml(cfg)))
    assert again == cfg
    assert again.train.learning_rate == [1e-5, 2e-6, 3e-7]


# ---------------------------------------------------------------- flag parsing


def test_parse_overrides_both_forms():
    out = parse_overrides(["--train.epochs=3", "--spin.beta", "0.5", "--model.name_or_path", "a/b",
                           "--run.progress=false"])
    # flags stay as typed text until merged against the field's type
    assert out == {"train": {"epochs": "3"}, "spin": {"beta": "0.5"}, "model": {"name_or_path": "a/b"},
                   "run": {"progress": "false"}}
    cfg = build(overrides=["--train.epochs=3", "--spin.beta", "0.5", "--model.name_or_path", "a/b",
                           "--run.progress=false"])
    assert (cfg.train.epochs, cfg.spin.beta, cfg.model.name_or_path, cfg.run.progress) == (3, 0.5, "a/b", False)


def test_flag_values_are_read_as_yaml():
    cfg = build(overrides=["--data.max_train_rows=null", "--train.epochs=2", "--run.progress=true",
                           "--run.dir=runs/x", "--data.val=", "--train.mixed_precision=no",
                           "--model.revision=20240101", "--model.chat_template={% if x %}y{% endif %}"])
    assert cfg.data.max_train_rows is None
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    assert cfg.run.progress is True
    assert cfg.run.dir == "runs/x"
    assert cfg.data.val is None  # empty value -> null
    # text fields take the flag verbatim (YAML would read these as a bool, an int, or fail)
    assert cfg.train.mixed_precision == "no" and cfg.model.revision == "20240101"
    assert cfg.model.chat_template == "{% if x %}y{% endif %}"
    with pytest.raises(UserError, match="train.epochs: cannot read"):
        build(overrides=["--train.epochs={x"])
    with pytest.raises(UserError, match="needs a value"):
        build(overrides=["--data.val", "--train.epochs=3"])
    with pytest.raises(UserError, match="finite"):
        build(overrides=["--train.weight_decay=nan"])


def test_value_containing_equals_sign():
    out = parse_overrides(["--eval.checker=pkg.mod:check"])
    assert out == {"eval": {"checker": "pkg.mod:check"}}
    out = parse_overrides(["--model.chat_template=a==b"])
    assert out["model"]["chat_template"] == "a==b"


def test_space_form_takes_negative_number():
    assert build(overrides=["--train.weight_decay", "-0.5"]).train.weight_decay == -0.5


@pytest.mark.parametrize("args", [["train.epochs=3"], ["--epochs=3"], ["-t.epochs=3"], ["--train.a.b=1"],
                                  ["--train=3"]])
def test_malformed_flags_are_user_errors(args):
    with pytest.raises(UserError, match="overrides look like --section.key=value"):
        parse_overrides(args)
    with pytest.raises(UserError):
        build(overrides=args)


def test_empty_section_name_is_user_error():
    with pytest.raises(UserError, match="overrides look like --section.key=value"):
        build(overrides=["--.epochs=3"])


def test_flag_without_value_at_end():
    with pytest.raises(UserError, match=r"--train\.epochs needs a value"):
        parse_overrides(["--spin.beta=0.2", "--train.epochs"])


def test_later_flag_wins():
    assert build(overrides=["--train.epochs=3", "--train.epochs=5"]).train.epochs == 5


# ---------------------------------------------------------------- lists and per_iteration


def test_list_learning_rate_and_per_iteration():
    cfg = build(overrides=["--train.learning_rate=[1e-5,2e-6]", "--spin.iterations=2"])
    # "1e-5" is a string in YAML 1.1: each element is coerced to float.
    assert cfg.train.learning_rate == [1e-5, 2e-6]
    assert all(type(v) is float for v in cfg.train.learning_rate)
    assert cfg.per_iteration("learning_rate", 0) == 1e-5
    assert cfg.per_iteration("learning_rate", 1) == 2e-6
    # beta is a scalar here: the same value every iteration
    assert cfg.per_iteration("beta", 0) == 0.1
    assert cfg.per_iteration("beta", 1) == 0.1


def test_per_iteration_beta_list_and_scalar_lr():
    cfg = build(overrides=["--spin.beta=[0.1, 0.2, 0.4]", "--train.learning_rate=3e-7"])
    assert [cfg.per_iteration("beta", t) for t in range(3)] == [0.1, 0.2, 0.4]
    assert [cfg.per_iteration("learning_rate", t) for t in range(3)] == [3e-7] * 3
    assert type(cfg.per_iteration("learning_rate", 0)) is float


def test_list_from_yaml(tmp_path):
    cfg = build(write(tmp_path, "train:\n  learning_rate:\n    - 5e-7\n    - 1.0e-7\n    - 1\n"))
    assert cfg.train.learning_rate == [5e-7, 1e-7, 1.0]
    assert all(type(v) is float for v in cfg.train.learning_rate)


def test_list_with_bad_element_names_the_index():
    with pytest.raises(UserError, match=r"train\.learning_rate"):
        build(overrides=["--train.learning_rate=[1e-5,abc]"])


def test_list_not_allowed_where_scalar_expected():
    with pytest.raises(UserError, match=r"train\.weight_decay"):
        build(overrides=["--train.weight_decay=[0.1,0.2]"])


# ---------------------------------------------------------------- YAML 1.1 float strings


def test_yaml11_float_strings_are_coerced(tmp_path):
    # PyYAML (YAML 1.1) reads 5e-7 and 1E-5 (no dot) as strings; config turns them into floats.
    y = write(tmp_path, "train:\n  learning_rate: 5e-7\n  weight_decay: 1E-5\nspin:\n  beta: 2e-1\n"
                        "sft:\n  learning_rate: 3e-5\n")
    cfg = build(y)
    assert cfg.train.learning_rate == 5e-7 and type(cfg.train.learning_rate) is float
    assert cfg.train.weight_decay == 1e-5 and type(cfg.train.weight_decay) is float
    assert cfg.spin.beta == 0.2 and type(cfg.spin.beta) is float
    assert cfg.sft.learning_rate == 3e-5


def test_flag_float_strings_are_coerced():
    cfg = build(overrides=["--train.learning_rate=5e-7", "--generation.temperature=7e-1"])
    assert cfg.train.learning_rate == 5e-7 and type(cfg.train.learning_rate) is float
    assert cfg.generation.temperature == 0.7


def test_int_given_for_float_becomes_float():
    cfg = build(overrides=["--train.max_grad_norm=2"])
    assert cfg.train.max_grad_norm == 2.0 and type(cfg.train.max_grad_norm) is float


# ---------------------------------------------------------------- unknown names


def test_unknown_key_suggests_nearest():
    with pytest.raises(UserError) as e:
        build(overrides=["--train.learning_rat=1e-5"])
    msg = str(e.value)
    assert "train.learning_rat" in msg
    assert "did you mean 'train.learning_rate'" in msg
    assert msg.startswith("command line")


def test_unknown_key_in_yaml_names_file_and_nearest(tmp_path):
    y = write(tmp_path, "spin:\n  itterations: 3\n")
    with pytest.raises(UserError) as e:
        build(y)
    assert str(y) in str(e.value)
    assert "'spin.itterations'" in str(e.value)
    assert "did you mean 'spin.iterations'" in str(e.value)


def test_unknown_section_suggests_nearest(tmp_path):
    with pytest.raises(UserError, match=r"unknown section 'trian'.*did you mean 'train'"):
        build(overrides=["--trian.epochs=1"])
    with pytest.raises(UserError, match=r"unknown section 'generaton'.*did you mean 'generation'"):
        build(write(tmp_path, "generaton:\n  top_p: 0.9\n"))


def test_unknown_name_far_from_everything_lists_valid_keys():
    with pytest.raises(UserError) as e:
        build(overrides=["--spin.zzzzzzzzzzzz=1"])
    msg = str(e.value)
    assert "valid keys" in msg
    for f in dataclasses.fields(C.SPINConfig):
        assert f"spin.{f.name}" in msg


def test_unknown_in_base_is_attributed_to_defaults():
    with pytest.raises(UserError, match=r"built-in defaults: unknown key 'train\.epoch'.*'train\.epochs'"):
        build(base={"train": {"epoch": 1}})


# ---------------------------------------------------------------- wrong types


@pytest.mark.parametrize("flag,key", [
    ("--train.epochs=abc", "train.epochs"),
    ("--train.epochs=2.5", "train.epochs"),
    ("--train.epochs=true", "train.epochs"),   # bool is not an int
    ("--run.progress=1", "run.progress"),      # int is not a bool
    ("--train.learning_rate=abc", "train.learning_rate"),
    ("--train.learning_rate=true", "train.learning_rate"),
    ("--train.max_steps=abc", "train.max_steps"),
    ("--spin.loss_type=[sigmoid]", "spin.loss_type"),
    ("--model.name_or_path=null", "model.name_or_path"),
    ("--spin.beta=", "spin.beta"),
    ("--generation.top_p={a: 1}", "generation.top_p"),
])
def test_wrong_type_is_user_error_naming_key(flag, key):
    with pytest.raises(UserError) as e:
        build(overrides=[flag])
    msg = str(e.value)
    assert key in msg
    assert "expected" in msg


def test_wrong_type_in_yaml_names_file_and_key(tmp_path):
    y = write(tmp_path, "data:\n  max_length: long\n")
    with pytest.raises(UserError) as e:
        build(y)
    assert str(y) in str(e.value)
    assert "data.max_length" in str(e.value)
    assert "an integer" in str(e.value)


def test_optional_fields_accept_null_and_value(tmp_path):
    cfg = build(write(tmp_path, "train:\n  max_steps: null\ndata:\n  max_eval_rows: null\n  val: v.jsonl\n"))
    assert cfg.train.max_steps is None
    assert cfg.data.max_eval_rows is None
    assert cfg.data.val == "v.jsonl"
    assert build(overrides=["--train.max_steps=7"]).train.max_steps == 7


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="section 'train' must be a mapping"):
        build(write(tmp_path, "train: 3\n"))


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="expected a mapping of sections"):
        build(write(tmp_path, "- train\n- spin\n"))


def test_merge_directly():
    cfg = Config()
    out = merge(cfg, {"spin": {"loss_type": "hinge"}}, "test")
    assert out is cfg
    assert cfg.spin.loss_type == "hinge"
    with pytest.raises(UserError, match=r"^test: "):
        merge(cfg, {"spin": {"loss_type": [3]}}, "test")


# ---------------------------------------------------------------- YAML file handling


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        build(tmp_path / "absent.yaml")


def test_invalid_yaml_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        build(write(tmp_path, "train: [1, 2\n  epochs: :\n"))


def test_python_object_tag_is_rejected_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    y = write(tmp_path, f"run:\n  dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError) as e:
        build(y)
    assert str(y) in str(e.value)
    assert not marker.exists()


def test_python_object_tag_for_a_class_is_rejected(tmp_path):
    y = write(tmp_path, "!!python/object:spinlm.config.Config {}\n")
    with pytest.raises(UserError, match="not valid YAML"):
        build(y)


def test_safe_load_is_what_reads_files(tmp_path, monkeypatch):
    calls = []
    real = parse.yaml.safe_load

    def spy(text):
        calls.append(text)
        return real(text)

    monkeypatch.setattr(parse.yaml, "safe_load", spy)  # spinlm.config.parse reads the files and the flags
    build(write(tmp_path, "train: {epochs: 4}\n"), ["--train.batch_size=2"])
    assert any("epochs: 4" in str(c) for c in calls)
    assert "2" in calls  # flag values go through safe_load too


# ---------------------------------------------------------------- validate


def test_validate_accepts_good_config():
    validate(build(overrides=REQUIRED))
    validate(build(overrides=[*REQUIRED, "--train.learning_rate=[1e-5,2e-6,1e-6]", "--spin.beta=[0.1,0.1,0.2]"]))
    validate(Config(), need=())


def test_validate_requires_model_and_data():
    with pytest.raises(UserError) as e:
        validate(Config())
    problems = problems_of(e)
    assert any(p.startswith("model.name_or_path is required") for p in problems)
    assert any(p.startswith("data.train is required") for p in problems)
    assert len(problems) == 2


def test_validate_need_selects_requirements():
    with pytest.raises(UserError) as e:
        validate(Config(), need=("model",))
    assert "model.name_or_path is required" in str(e.value)
    assert "data.train" not in str(e.value)
    with pytest.raises(UserError) as e:
        validate(build(overrides=["--model.name_or_path=m"]), need=("model", "data"))
    assert "data.train is required" in str(e.value)
    assert "model.name_or_path" not in str(e.value)


def test_validate_reports_all_problems_at_once():
    cfg = build(overrides=[*REQUIRED,
                           "--train.learning_rate=-1e-5",
                           "--spin.beta=0",
                           "--spin.mix_window=0",
                           "--spin.loss_type=ipo"])
    with pytest.raises(UserError) as e:
        validate(cfg)
    problems = problems_of(e)
    assert str(e.value).startswith("invalid configuration:")
    assert any(p.startswith("train.learning_rate must be > 0") for p in problems)
    assert any(p.startswith("spin.beta must be > 0") for p in problems)
    assert any(p.startswith("spin.mix_window must be > 0") for p in problems)
    assert any(p.startswith("spin.loss_type must be one of sigmoid, hinge") and "'ipo'" in p for p in problems)
    assert len(problems) == 4


def test_validate_iterations_and_short_lists():
    cfg = build(overrides=[*REQUIRED, "--spin.iterations=3", "--train.learning_rate=[1e-5,2e-6]",
                           "--spin.beta=[0.1]"])
    with pytest.raises(UserError) as e:
        validate(cfg)
    problems = problems_of(e)
    assert any("train.learning_rate lists 2 values but spin.iterations is 3" in p for p in problems)
    assert any("spin.beta lists 1 values but spin.iterations is 3" in p for p in problems)
    assert len(problems) == 2

    cfg = build(overrides=[*REQUIRED, "--spin.iterations=0"])
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert problems_of(e) == ["spin.iterations must be > 0; got 0"]


def test_validate_everything_at_once():
    cfg = build(overrides=["--train.learning_rate=[1e-5,-2e-6]", "--spin.beta=-0.1", "--spin.mix_window=0",
                           "--spin.iterations=0", "--spin.loss_type=dpo", "--train.optimizer=sgd",
                           "--generation.top_p=0", "--train.warmup_ratio=1", "--data.max_prompt_length=2048",
                           "--train.max_steps=0"])
    with pytest.raises(UserError) as e:
        validate(cfg)
    text = str(e.value)
    for needle in ("model.name_or_path is required", "data.train is required",
                   "train.learning_rate must be > 0", "spin.beta must be > 0", "spin.mix_window must be > 0",
                   "spin.iterations must be > 0", "spin.loss_type must be one of", "train.optimizer must be one of",
                   "generation.top_p must be in (0, 1]", "train.warmup_ratio must be in [0, 1)",
                   "data.max_prompt_length must be smaller than data.max_length", "train.max_steps must be > 0"):
        assert needle in text, needle
    assert len(problems_of(e)) == 12


@pytest.mark.parametrize("section,key", sorted(C.CHOICES))
def test_every_choice_field_is_checked(section, key):
    # Values given as Python strings (through merge), so YAML 1.1 booleans such as `no` stay strings.
    # server_url: what generation.backend=server needs besides the choice (unused by the local backend)
    required = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                "generation": {"server_url": "http://127.0.0.1:8000"}}
    cfg = build(base=required)
    merge(cfg, {section: {key: "not_a_choice"}}, "test")
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert problems_of(e) == [f"{section}.{key} must be one of {', '.join(C.CHOICES[section, key])}; "
                              "got 'not_a_choice'"]
    # and every listed choice is accepted (zero3 where DeepSpeed is installed; else refused for that alone)
    for choice in C.CHOICES[section, key]:
        cfg = build(base=required)
        merge(cfg, {section: {key: choice}}, "test")
        if (section, key, choice) == ("train", "strategy", "zero3") and importlib.util.find_spec("deepspeed") is None:
            with pytest.raises(UserError) as e:
                validate(cfg)
            assert [p.split(":")[0] for p in problems_of(e)] == ["train.strategy zero3 needs DeepSpeed"]
            continue
        validate(cfg)


def test_quoted_no_is_a_string_in_yaml(tmp_path):
    cfg = build(write(tmp_path, 'train:\n  mixed_precision: "no"\n'), [*REQUIRED])
    assert cfg.train.mixed_precision == "no"
    validate(cfg)


def test_choices_are_the_literal_annotations_in_their_historic_order():
    # validate() lists bad choices in CHOICES order: generation's before data's, as it always has
    assert list(C.CHOICES)[:6] == [("model", "dtype"), ("generation", "backend"), ("generation", "vllm_layout"),
                                   ("data", "format"), ("data", "turn"), ("data", "prompt_overflow")]
    for (section, key), choices in C.CHOICES.items():
        hint = typing.get_type_hints(C.SECTIONS[section])[key]
        assert typing.get_origin(hint) is typing.Literal and typing.get_args(hint) == choices


def test_choices_match_loss_module():
    from spinlm.loss import LOSS_TYPES

    assert tuple(C.CHOICES["spin", "loss_type"]) == tuple(LOSS_TYPES)


def test_validate_boundaries():
    validate(build(overrides=[*REQUIRED, "--generation.top_p=1", "--train.warmup_ratio=0",
                              "--spin.mix_window=1", "--spin.iterations=1", "--train.learning_rate=[1e-6]"]))
    with pytest.raises(UserError, match="data.max_prompt_length must be smaller"):
        validate(build(overrides=[*REQUIRED, "--data.max_prompt_length=1024", "--data.max_length=1024"]))


# ---------------------------------------------------------------- reference()


def test_reference_mentions_every_field():
    text = reference()
    lines = text.splitlines()
    assert len(lines) == len(C.SECTIONS) + sum(len(dataclasses.fields(cls)) for cls in C.SECTIONS.values())
    current = None
    seen: dict[str, set[str]] = {}
    for line in lines:
        if not line.startswith(" "):
            current = line.rstrip(":")
            seen[current] = set()
        else:
            seen[current].add(line.split()[0])
    assert set(seen) == set(C.SECTIONS) == {f.name for f in dataclasses.fields(Config)}
    for section, cls in C.SECTIONS.items():
        assert seen[section] == {f.name for f in dataclasses.fields(cls)}, section
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f"{section}.{f.name} has no help"
            assert f.metadata["help"] in text


def test_reference_shows_types_and_defaults():
    text = reference()
    assert "  learning_rate (a number or a list of a number, default 5e-07): " in text
    assert "  max_steps (an integer or null, default None): " in text
    assert "  progress (true/false, default True): " in text
    assert "  loss_type (a string, default 'sigmoid'): " in text


def test_sections_cover_config():
    hints = typing.get_type_hints(Config)
    assert set(C.SECTIONS) == set(hints)


def test_docs_config_reference_is_generated_from_the_schema(capsys):
    """docs/config.md is `spinlm config --markdown`: a key added, removed or re-documented makes it stale."""
    from spinlm.cli import main
    from spinlm.config import SECTIONS

    assert main(["config", "--markdown"]) == 0
    printed = capsys.readouterr().out
    checked_in = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert printed == checked_in, "docs/config.md is stale: run `spinlm config --markdown > docs/config.md`"
    for section, cls in SECTIONS.items():  # every key has its row
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in checked_in
