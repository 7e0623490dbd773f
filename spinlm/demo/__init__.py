"""Self-contained demo: a bundled verifiable task and a tiny locally built model."""
