"""``python -m tuner`` — ``make tune``: search backbone × freeze × LR × dropout × focal γ (and more).

With no arguments: the embedded default (local Ray, SQLite runs/optuna.db, CPU, the elpv dataset,
a small budget). On a machine where ``ray start``/``ray up`` left a Ray node, it uses that cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from edgetune.dataclass_cli import Flag, HelpFormatter, add_fields, add_version, field_values
from edgetune.device import TIMING_BACKENDS
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.logs import setup_cli_logging
from trainer.metric import METRIC_NAMES
from trainer.ray_trainer import PLACEMENT_STRATEGIES
from tuner.options import TuneOptions, load_options_file, options_yaml


def _irregular() -> dict[str, Flag]:
    """The fields whose flag is not the generated one. Every other field of tuner.options.TuneOptions gets
    ``--field-name`` (``--no-field-name`` for a bool that defaults to True) with its type, default and help."""
    return {
        "time_budget_s": Flag("--time-budget"),
        "timing_timeout_s": Flag("--timing-timeout"),
        "backbones": Flag(help="comma list restricting the backbone choices"),
        "sets": Flag("--set", repeat=True, metavar="KEY=VALUE"),
        "refit": Flag(help="export the best trial's own checkpoint instead of a longer refit"),
        "export": Flag(help="do not export the best trial as a bundle"),
        "placement_strategy": Flag(choices=PLACEMENT_STRATEGIES),
        "timing_backend": Flag(choices=TIMING_BACKENDS),
        "metric": Flag(choices=METRIC_NAMES),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuner", description=__doc__, formatter_class=HelpFormatter)
    add_fields(p, TuneOptions, _irregular())
    p.add_argument(
        "--cluster-config",
        default="cluster.yaml",  # not a study option: where the study runs
        help="after `ray up` of this file from here, the study runs on that cluster (EDGETUNE_LOCAL=1: here)",
    )
    p.add_argument(
        "--config",
        dest="options_file",
        default="",
        metavar="RUN_YAML",
        help="the study's options from a YAML file (what --print-config prints, or a study's "
        "<out>/tune_options.yaml); flags given with it override it (--set adds to its sets)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective options as YAML (every field, derived defaults resolved) and exit",
    )
    add_version(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``python -m tuner``'s arguments; with ``--config FILE`` the file's values are the defaults the flags given
    override (ConfigError: an unknown key in the file, naming the allowed ones; a value of the wrong type)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.options_file:
        values = load_options_file(args.options_file)
        parser.set_defaults(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
        args = parser.parse_args(argv)
    return args


def tune_options(args: argparse.Namespace) -> TuneOptions:
    """The study's options from parsed ``python -m tuner`` arguments (ConfigError where they are invalid)."""
    return TuneOptions(**field_values(args, TuneOptions))


def optuna_experimental_warning() -> type[Warning]:
    from optuna.exceptions import ExperimentalWarning

    return ExperimentalWarning


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_cli_logging(verbose=args.verbose)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's table reporter (trials, states, best so far)
    warnings.filterwarnings("ignore", category=optuna_experimental_warning())
    try:
        if args.print_config:
            sys.stdout.write(options_yaml(tune_options(args)))
            return 0
        from tuner.run import process_start, run_study  # noqa: PLC0415 - lazy: optuna, torch

        opts = tune_options(args)
        from tuner.launcher import forward, launched_cluster  # noqa: PLC0415 - late-bound: tests patch it

        head = launched_cluster(args.cluster_config, args.address)
        if head:
            return forward(
                args.cluster_config, head, list(sys.argv[1:] if argv is None else argv), opts.study, opts.out
            )
        summary = run_study(opts, started_at=process_start())
    except (ConfigError, EdgetuneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failure = summary.failure()
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
