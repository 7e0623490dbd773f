"""spinlm: Self-Play Fine-Tuning (SPIN, Chen et al., ICML 2024) for Hugging Face causal LMs."""

__version__ = "0.1.0"
