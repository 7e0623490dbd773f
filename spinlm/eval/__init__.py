"""Evaluation beyond the held-out metrics: LLM-as-judge (MT-Bench style) and lm-evaluation-harness."""
