"""Typed configuration: dataclasses whose `help` metadata is the documentation.

Precedence: dataclass defaults < YAML file < command-line `--section.key=value` flags.
An unknown key is an error naming the closest valid key; every value is type-checked and
all cross-field problems are reported at once.

Where each part lives:
  schema.py  the sections (RunConfig ... EvalConfig, Config): every key's type, default and help;
             CHOICES (read from the Literal[...] annotations), SECTIONS, TRACKERS / trackers()
  parse.py   YAML files (yaml.safe_load only), flags, type coercion, merge(), build(), to_yaml(),
             reference() (what `spinlm config` prints), reference_markdown() (docs/config.md)
  rules.py   validate(): the cross-field checks
"""

from spinlm.config.parse import Raw, build, load_yaml, merge, parse_overrides, reference, reference_markdown, to_yaml
from spinlm.config.rules import validate
from spinlm.config.schema import (
    CHOICES,
    PLANNED,
    SECTIONS,
    TRACKERS,
    Config,
    DataConfig,
    EvalConfig,
    GenerationConfig,
    JudgeConfig,
    ModelConfig,
    PackingConfig,
    PeftConfig,
    RunConfig,
    SFTConfig,
    SPINConfig,
    TrainConfig,
    trackers,
)

__all__ = [
    "CHOICES", "PLANNED", "SECTIONS", "TRACKERS", "Config", "DataConfig", "EvalConfig", "GenerationConfig",
    "JudgeConfig", "ModelConfig", "PackingConfig", "PeftConfig", "RunConfig", "SFTConfig", "SPINConfig",
    "TrainConfig", "Raw", "build", "load_yaml", "merge", "parse_overrides", "reference", "reference_markdown",
    "to_yaml", "trackers", "validate",
]
