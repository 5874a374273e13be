"""``make report`` with no ``STUDIES=``: the studies of a storage, one line each (Optuna's public
``get_all_study_summaries``), so that the names to compare with ``make report STUDIES=a,b`` can be picked."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from edgetune.dataclass_cli import HelpFormatter, add_version
from edgetune.logs import setup_cli_logging
from edgetune.markdown import markdown_table
from tuner.device import CACHE_STUDY
from tuner.storage import masked, missing_sqlite, rdb_storage

DEFAULT_STORAGE = "sqlite:///runs/optuna.db"


@dataclass(frozen=True)
class StudyListing:
    """One study of a storage as ``make report`` lists it."""

    name: str
    trials: int
    best_value: float | None  #: the first objective's best value (single-objective studies; None otherwise)
    started: str  #: when its first trial started (ISO, seconds), "" before any
    dataset: str  #: the dataset it searched (the study's ``dataset`` attr), "" where not recorded


def list_studies(storage: str) -> list[StudyListing]:
    """The studies in ``storage`` (not the latency cache, which holds timings, not trials), sorted by name."""
    import optuna

    out = []
    for s in optuna.get_all_study_summaries(rdb_storage(storage), include_best_trial=True):
        if s.study_name == CACHE_STUDY:
            continue
        best = s.best_trial.value if s.best_trial is not None and len(s.directions) == 1 else None
        started = s.datetime_start.isoformat(timespec="seconds") if s.datetime_start else ""
        out.append(StudyListing(s.study_name, s.n_trials, best, started, str(s.user_attrs.get("dataset", ""))))
    return sorted(out, key=lambda x: x.name)


def format_listing(rows: list[StudyListing], storage: str) -> str:
    """A Markdown table of ``rows`` with a line naming the storage (its password masked) and the next command."""
    where = masked(storage)
    if not rows:
        return f"no studies in {where}\n"
    cols = ["study", "trials", "best value", "started", "dataset"]
    table = markdown_table(
        [
            dict(
                zip(
                    cols,
                    (r.name, r.trials, "" if r.best_value is None else f"{r.best_value:.4f}", r.started, r.dataset),
                    strict=True,
                )
            )
            for r in rows
        ],
        cols,
    )
    return (
        f"studies in {where}:\n\n{table}\n\ncompare some: make report STUDIES={','.join(r.name for r in rows[:2])}"
        f"{'' if storage == DEFAULT_STORAGE else ' STORAGE=…'}\n"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuner.studies", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_cli_logging(verbose=False)
    missing = missing_sqlite(a.storage)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    sys.stdout.write(format_listing(list_studies(a.storage), a.storage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
