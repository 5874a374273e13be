"""edgetune tuner: Ray Tune + Optuna search over backbone, frozen layers, LR, dropout, focal γ and more.

Composes the trainer (never reimplements training): ``space`` (define-by-run search space from YAML),
``searcher`` (OptunaSearch with PRUNED states and user attrs), ``trial`` (the Tune trial), ``run``
(the study), ``report`` (leaderboard, plots, study comparison), ``cluster`` (local vs existing Ray).
"""
