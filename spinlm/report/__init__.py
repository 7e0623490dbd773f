"""Reporting: a run's report (RUN/report/README.md), its plots, the models' README.md cards, and publishing.

- runs: reads a run directory (load_run), the data the report and the cards share;
- plots: the matplotlib PNGs (an optional extra, imported lazily); `figure` is shared with the experiments;
- cards: the README.md model card in every model directory of a run;
- report: the verdict and RUN/report/README.md (`spinlm report RUN`), using the three above;
- publish: the models and their cards on the Hugging Face Hub (`spinlm push RUN`, run.push_to_hub).
"""
