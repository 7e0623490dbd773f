"""The stages of the self-play loop, one module each: sft, generate, score, train, evaluate. A stage imports the
library, never another stage."""
