"""``python -m tuner`` — ``make tune``: search backbone × freeze × LR × dropout × focal γ (and more).

With no arguments: the embedded default (local Ray, SQLite runs/optuna.db, CPU, the elpv dataset,
a small budget). On a machine where ``ray start``/``ray up`` left a Ray node, it uses that cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from edge_server.timing import TIMING_BACKENDS
from edgetune.errors import ConfigError, EdgetuneError
from trainer.metric import METRIC_NAMES
from trainer.ray_trainer import PLACEMENT_STRATEGIES

#: CLI defaults = TuneOptions defaults (the embedded ``make tune`` budget); kept in one place: tuner/run.py.
_BUDGET = ("trials", "epochs", "img", "max_images", "time_budget_s", "grace_period", "reduction_factor", "metric",
           "refit_share", "refit_max_epochs", "timing_runs", "timing_warmup", "timing_timeout_s")


def _defaults() -> dict[str, object]:
    from dataclasses import fields

    from tuner.run import TuneOptions

    return {f.name: f.default for f in fields(TuneOptions) if f.name in _BUDGET}


def _resources(text: str) -> dict[str, float]:
    """``slot=1,node=0.5`` -> {"slot": 1.0, "node": 0.5}."""
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        k, sep, v = part.partition("=")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            sep = ""
        if not sep or not k.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT[,NAME=AMOUNT], got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    d = _defaults()
    a("--data", default="elpv", help="built-in dataset (elpv, textures) or an ImageFolder/CSV path")
    a("--study", default="", help="study name (default <dataset>-default)")
    a("--trials", type=int, default=d["trials"], help="optional cap on the number of trials (0 = the time budget decides)")
    a("--epochs", type=int, default=d["epochs"], help="max epochs per trial (ASHA max_t; each trial's LR schedule)")
    a("--time-budget", type=float, default=d["time_budget_s"],
      help="seconds for search + refit + export, counted from the start (0 = none; then --trials is needed)")
    a("--storage", default="", help="Optuna storage URL (default sqlite:///runs/optuna.db; postgresql://… for shared)")
    a("--storage-path", default="", help="Ray storage for trial checkpoints: a directory or s3://bucket/prefix "
      "(default $EDGETUNE_STORAGE_PATH, else <out>/ray); must be shared on a multi-node cluster")
    a("--cluster-config", default="cluster.yaml",
      help="after `ray up` of this file from here, the study runs on that cluster (EDGETUNE_LOCAL=1: here)")
    a("--space", default="", help="search space YAML (default tuner/default_space.yaml)")
    a("--backbones", default="", help="comma list restricting the backbone choices")
    a("--config", default="", help="base TrainConfig YAML for every trial")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="base config override (repeatable)")
    a("--img", type=int, default=d["img"], help="fix the input size of every trial (0 = searched, or backbone default)")
    a("--max-images", type=int, default=d["max_images"], help="stratified subset of the dataset (0 = all)")
    a("--gpus-per-trial", type=float, default=0.0)
    a("--workers-per-trial", type=int, default=1, help=">1: each trial is a Ray Train DDP run")
    a("--cpus-per-worker", type=float, default=1.0)
    a("--resources-per-worker", type=_resources, default={}, metavar="NAME=AMOUNT,…",
      help="extra custom Ray resources per worker (e.g. slot=1)")
    a("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES,
      help="placement of a DDP trial's workers (STRICT_SPREAD: each on its own node)")
    a("--max-concurrent", type=int, default=0)
    a("--grace-period", type=int, default=d["grace_period"], help="ASHA's first rung in epochs")
    a("--reduction-factor", type=int, default=d["reduction_factor"])
    a("--no-refit", action="store_true", help="export the best trial's own checkpoint instead of a longer refit")
    a("--refit-share", type=float, default=d["refit_share"], help="share of the time budget kept for the refit")
    a("--refit-max-epochs", type=int, default=d["refit_max_epochs"], help="cap on refit epochs (0 = 3 x --epochs)")
    a("--seed", type=int, default=0)
    a("--out", default="", help="output dir (default runs/<study>)")
    a("--resume", action="store_true", help="continue the same study and Ray experiment")
    a("--multi-objective", action="store_true",
      help="maximise the metric and minimise p50 latency (on --target, else an estimate on the driver's node)")
    a("--max-latency-ms", type=float, default=0.0,
      help="latency constraint (p50, ms): slower architectures are rejected before training (PRUNED, with reason)")
    a("--target", default="", help="device in the loop: time every architecture on the Ray node carrying "
      "edge_target:<TARGET> (join it with `make edge-node HEAD=<host:port> TARGET=<name>`)")
    a("--timing-runs", type=int, default=d["timing_runs"], help="timed runs per architecture (p50/p90 over them)")
    a("--timing-warmup", type=int, default=d["timing_warmup"], help="untimed runs before each timing")
    a("--timing-timeout", type=float, default=d["timing_timeout_s"],
      help="seconds a trial waits for its timing (edge node down) before it is marked with the reason")
    a("--timing-backend", default="auto", choices=TIMING_BACKENDS,
      help="runtime of the timing on the device (auto: TensorRT where present, else ONNX Runtime)")
    a("--max-failures", type=int, default=1, help="restarts of a crashed trial from its last checkpoint")
    a("--address", default="", help="Ray cluster address; 'local' forces a local instance "
      "(default: RAY_ADDRESS, a running node started by `ray start`/`ray up` on this machine, or local)")
    a("--verbose", action="store_true", help="list every place looked for each backbone left out for missing weights")
    a("--no-export", action="store_true", help="do not export the best trial as a bundle")
    a("--metric", default=d["metric"], choices=METRIC_NAMES,
      help="selects epochs, trials and the final model (default val_macro_f1: see README, 'Why macro-F1')")
    return p


def optuna_experimental_warning() -> type[Warning]:
    from optuna.exceptions import ExperimentalWarning

    return ExperimentalWarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's table reporter (trials, states, best so far)
    warnings.filterwarnings("ignore", category=optuna_experimental_warning())
    try:
        from tuner.run import TuneOptions, process_start, run_study

        opts = TuneOptions(
            data=args.data, study=args.study, trials=args.trials, epochs=args.epochs, time_budget_s=args.time_budget,
            storage=args.storage, space=args.space, backbones=tuple(b for b in args.backbones.split(",") if b),
            config=args.config, sets=tuple(args.set), img=args.img, max_images=args.max_images,
            storage_path=args.storage_path, gpus_per_trial=args.gpus_per_trial,
            workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
            resources_per_worker=args.resources_per_worker, placement_strategy=args.placement_strategy,
            max_concurrent=args.max_concurrent, grace_period=args.grace_period,
            reduction_factor=args.reduction_factor, seed=args.seed, out=args.out, resume=args.resume,
            multi_objective=args.multi_objective, max_latency_ms=args.max_latency_ms, max_failures=args.max_failures,
            address=args.address, export=not args.no_export, metric=args.metric, refit=not args.no_refit,
            refit_share=args.refit_share, refit_max_epochs=args.refit_max_epochs, verbose=args.verbose,
            target=args.target, timing_runs=args.timing_runs, timing_warmup=args.timing_warmup,
            timing_timeout_s=args.timing_timeout, timing_backend=args.timing_backend)
        from tuner.launcher import forward, launched_cluster

        head = launched_cluster(args.cluster_config, args.address)
        if head:
            return forward(args.cluster_config, head, list(sys.argv[1:] if argv is None else argv), opts.study,
                           opts.out)
        run_study(opts, started_at=process_start())
    except (ConfigError, EdgetuneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
