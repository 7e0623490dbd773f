"""Reporting: a run's report (RUN/report/README.md), its plots and the models' README.md cards.

- runs: reads a run directory (load_run), the data the report and the cards share;
- plots: the matplotlib PNGs (an optional extra, imported lazily); `figure` is shared with the experiments;
- cards: the README.md model card in every model directory of a run;
- report: the verdict and RUN/report/README.md (`spinlm report RUN`), using the three above.
"""
