"""Ray Tune sweeps over raydfml experiments: ``python launch.py --tune tune_configs/<name>.yaml``.

A sweep file (YAML) names the experiments to compare and how to search them::

    name: lr-deepinv                 # experiment directory: <storage>/<name> (default: the file's stem)
    scenario: mr                     # defaults of the three presets (each may also be a space dimension)
    method: deepinv
    profile: quick
    set:                             # fixed config overrides (dotted keys, as --set)
      train.baselines: []
    space:                           # the search space: dotted config keys, scenario, method, profile, seed
      method: {grid: [deepinv, purer]}
      learner.outer_lr: {loguniform: [1.0e-4, 1.0e-2]}
      learner.inner_lr: {choice: [0.01, 0.05]}
    num_samples: 1                   # samples per grid point (--num-samples overrides)
    metric: val_acc                  # meta-val accuracy: the only selection signal (test stays untouched)
    mode: max
    max_concurrent_trials: 2
    scheduler: {name: asha, grace_period: 5, reduction_factor: 2}     # asha (default) | pbt | hyperband | median | fifo
    search_alg: {name: basic}        # basic (default) | optuna | hyperopt | any name tune.create_searcher knows
    resources:                       # one placement group per trial: a bundle for the trial, one per actor
      workers: 1                     # TeacherPool actors per trial (0: everything inside the trial process)
      trial_cpus: 0.25               # the trial process (round loop, final meta-test)
      actor_cpus: 0.35               # each TeacherPool actor and the MetaLearner actor
      gpus_per_trial: auto           # auto: the cluster's GPUs / max_concurrent_trials (0 without GPUs)

Space entries are ``{grid: [...]}``, ``{choice: [...]}`` (for scenario, method and profile also
``{grid: all}``: every preset raydfml.config registers), ``{uniform: [lo, hi]}``,
``{loguniform: [lo, hi]}``, ``{quniform: [lo, hi, q]}``, ``{qloguniform: [lo, hi, q]}``,
``{randint: [lo, hi]}``, ``{qrandint: [lo, hi, q]}``, ``{lograndint: [lo, hi]}`` or a plain value.

Every trial runs the real engine (:func:`raydfml.experiment.run_method`): its actors are created
inside the trial's placement group, every round reports its metrics and a checkpoint with
``tune.report`` (``val_acc`` is the last meta-val accuracy: ``NaN`` before the first evaluation, so
the schedulers' decision points are aligned to ``train.eval_every``), an interrupted sweep resumes with
``Tuner.restore`` (``--resume``), and the last report carries the final meta-test (1-shot and 5-shot
accuracy with 95% CI). At the end ``trials.csv`` / ``trials.md`` (one row per trial) and
``best.json`` are written next to Tune's own files, and the best configuration is printed.
"""
from .results import trials_table, write_results
from .run import DEFAULT_STORAGE, SWEEP_JSON, prebuild_pools, run_sweep
from .search import build_scheduler, build_search_alg, checkpoints_to_keep, param_space, placement_group, trial_shares
from .sweep import DIMENSIONS, Sweep, check_sweep, load_sweep, trial_points

__all__ = ["DEFAULT_STORAGE", "DIMENSIONS", "SWEEP_JSON", "Sweep", "build_scheduler", "build_search_alg", "check_sweep",
           "checkpoints_to_keep", "load_sweep", "param_space", "placement_group", "prebuild_pools", "run_sweep",
           "trial_points", "trial_shares", "trials_table", "write_results"]
