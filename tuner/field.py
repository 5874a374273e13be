"""Warm retrain with field data: ``make tune DATA=<original> ADD=<labelled field folder> WARM=<previous study out>
[INIT=warm|<run>]`` (``python -m tuner.field --add … --warm … <python -m tuner's flags>``).

1. The field frames labelled with ``make label`` (``<ADD>/labels.csv``, with each capture's provenance) join the
   previous study's data: its ``split.json`` keeps every original image in its original split (so the original test
   set stays the same), and the field frames are split by *group* — camera id and time bucket (``--group-s``) — so
   near-duplicate frames of one camera and minute never sit on both sides; whole groups go to the field test set
   (``--field-test-share``), then to validation, the rest to training. One CSV manifest (``path,label,split`` plus
   provenance) is what the study trains on.
2. The previous study's best configurations (``--warm-top``, from its Optuna storage) are tried first: they become
   the first seeds of the search space, which the search enqueues (Ray's OptunaSearch ``points_to_evaluate`` →
   Optuna ``enqueue_trial``). ``--init`` starts every trial's backbone from the previous model (``warm``: the
   previous study's best checkpoint) or another run.
3. After the study, :mod:`tuner.field_report` compares the previous bundle and the new one on the same field test
   set and on the original test set (paired bootstrap intervals), and the new bundle records its parent.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from edgetune.dataclass_cli import add_version
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.fsutil import atomic_write_text
from edgetune.logs import setup_cli_logging
from fieldloop.labels import LABELS_CSV, read_labels_csv
from tuner.space import DEFAULT_SPACE
from tuner.storage import rdb_storage

FIELD_DIR = "field_data"
MANIFEST_COLUMNS = (
    "path",
    "label",
    "split",
    "source",
    "capture_id",
    "camera_id",
    "time_unix",
    "model_version",
    "labelled_at",
)


@dataclass(frozen=True)
class FieldRow:
    path: str  # absolute
    label: str
    split: str
    source: str  # home | field
    capture_id: str = ""
    camera_id: str = ""
    time_unix: str = ""
    model_version: str = ""
    labelled_at: str = ""


@dataclass(frozen=True)
class FieldData:
    """The joined data of a warm study (what crosses into the study and the report)."""

    manifest: Path
    classes: tuple[str, ...]
    rows: tuple[FieldRow, ...]
    groups: dict[str, str]  # field group -> split

    def subset(self, source: str, split: str) -> list[FieldRow]:
        return [r for r in self.rows if r.source == source and r.split == split]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            out.setdefault(r.source, {}).setdefault(r.split, 0)
            out[r.source][r.split] += 1
        return out


@dataclass(frozen=True)
class Previous:
    """The study a warm study starts from (its OUT folder)."""

    out: Path
    study: str
    storage: str
    space: str
    data: str
    bundle: Path
    split_file: Path

    @classmethod
    def read(cls, warm: str | Path) -> Previous:
        out = Path(warm).resolve()
        opts_file, split_file, bundle = out / "tune_options.yaml", out / "split.json", out / "bundle"
        missing = [p.name for p in (opts_file, split_file, bundle / "bundle.json") if not p.is_file()]
        if missing:
            raise ConfigError(
                f"WARM={warm} is not a finished study's output folder (missing {missing}); give the OUT "
                "of an earlier `make tune`"
            )
        opts = yaml.safe_load(opts_file.read_text(encoding="utf-8")) or {}
        return cls(
            out=out,
            study=str(opts.get("study", "")),
            storage=str(opts.get("storage", "")),
            space=str(opts.get("space", "")),
            data=str(opts.get("data", "")),
            bundle=bundle,
            split_file=split_file,
        )


def group_of(row: dict[str, str], group_s: float) -> str:
    try:
        bucket = int(float(row.get("time_unix") or 0) // group_s)
    except ValueError:
        bucket = 0
    return f"{row.get('camera_id', '')}@{bucket}"


def assign_groups(sizes: dict[str, int], test_share: float, val_share: float, seed: int) -> dict[str, str]:
    """Whole groups to test (until ``test_share`` of the frames), then val, the rest train; seeded order."""
    if len(sizes) < 3:
        raise ConfigError(
            f"the field frames form {len(sizes)} camera/time group(s); a held-out field test set needs "
            "at least 3 (more cameras, a longer capture, or a smaller --group-s)"
        )
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total = sum(sizes.values())
    out: dict[str, str] = {}
    done = {"test": 0, "val": 0}
    for g in order:
        if done["test"] < test_share * total:
            split = "test"
        elif done["val"] < val_share * total:
            split = "val"
        else:
            split = "train"
        out[g] = split
        if split in done:
            done[split] += sizes[g]
    if "train" not in out.values():  # every group went to test/val: the largest of them trains
        out[max((g for g in order if out[g] == "val"), key=lambda g: sizes[g])] = "train"
    return out


def home_rows(split_file: Path) -> tuple[tuple[str, ...], list[FieldRow]]:
    try:
        doc = json.loads(split_file.read_text(encoding="utf-8"))
        rows = [FieldRow(path=f["abs_path"], label=f["label"], split=f["split"], source="home") for f in doc["files"]]
        return tuple(doc["classes"]), rows
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{split_file} is not a study's split file ({e})") from None


def field_rows(
    add: Path, classes: tuple[str, ...], group_s: float, test_share: float, val_share: float, seed: int
) -> tuple[list[FieldRow], dict[str, str]]:
    labels = add / LABELS_CSV if add.is_dir() else add
    rows = read_labels_csv(labels)
    if not rows:
        raise ConfigError(f"{labels} lists no labelled frame (label them with `make label DIR={add}`)")
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise ConfigError(f"{labels}: labels {unknown} are not classes of the previous study {list(classes)}")
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[group_of(r, group_s)] = sizes.get(group_of(r, group_s), 0) + 1
    groups = assign_groups(sizes, test_share, val_share, seed)
    out = []
    for r in rows:
        p = Path(r["path"])
        p = p if p.is_absolute() else labels.parent / p
        if not p.is_file():
            raise ConfigError(f"{labels}: {r['path']} does not exist")
        out.append(
            FieldRow(
                path=str(p.resolve()),
                label=r["label"],
                split=groups[group_of(r, group_s)],
                source="field",
                capture_id=r["capture_id"],
                camera_id=r["camera_id"],
                time_unix=r["time_unix"],
                model_version=r["model_version"],
                labelled_at=r["labelled_at"],
            )
        )
    return out, groups


def build_field_data(
    prev: Previous,
    add: str | Path,
    out: Path,
    group_s: float = 60.0,
    test_share: float = 0.2,
    val_share: float = 0.2,
    seed: int = 0,
) -> FieldData:
    """The joined manifest in ``out/field_data/manifest.csv`` (+ ``groups.json``)."""
    classes, home = home_rows(prev.split_file)
    field, groups = field_rows(Path(add).resolve(), classes, group_s, test_share, val_share, seed)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for r in (*home, *field):
        w.writerow([getattr(r, c) for c in MANIFEST_COLUMNS])
    folder = out / FIELD_DIR
    manifest = folder / "manifest.csv"
    atomic_write_text(manifest, buf.getvalue())
    atomic_write_text(folder / "groups.json", json.dumps({"group_s": group_s, "groups": groups}, indent=1))
    return FieldData(manifest=manifest, classes=classes, rows=(*home, *field), groups=groups)


def warm_seeds(prev: Previous, top: int) -> list[dict[str, Any]]:
    """The previous study's best ``top`` finished configurations (best first) as search-space seeds."""
    import optuna

    try:
        study = optuna.load_study(study_name=prev.study, storage=rdb_storage(prev.storage))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"cannot open the previous study {prev.study!r} in {prev.storage}: {e}") from None
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE and t.values is not None
    ]
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    done.sort(key=lambda t: sign * float(t.values[0]))
    return [
        {"name": f"warm start: {prev.study} trial {t.number} ({float(t.values[0]):.4f})", "params": dict(t.params)}
        for t in done[:top]
    ]


def warm_space(prev: Previous, space: str, seeds: list[dict[str, Any]], out: Path) -> Path:
    """The search space with the previous best configurations as its first seeds (the space's own seeds follow)."""

    src = Path(space or prev.space or DEFAULT_SPACE)
    if not src.is_absolute() and not src.is_file():
        src = Path(__file__).resolve().parents[1] / src
    doc = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    names = set((doc.get("params") or {}).keys())
    kept = [{"name": s["name"], "params": {k: v for k, v in s["params"].items() if k in names}} for s in seeds]
    own = [s for s in doc.get("seeds") or [] if s.get("params") not in [k["params"] for k in kept]]
    doc["seeds"] = kept + own
    path = out / FIELD_DIR / "warm_space.yaml"
    atomic_write_text(
        path,
        "# " + f"warm start from {prev.out} (study {prev.study}); space {src}\n" + yaml.safe_dump(doc, sort_keys=False),
    )
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tuner.field",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    add_version(p)
    p.add_argument("--add", required=True, help="labelled field folder (make label) or its labels.csv")
    p.add_argument("--warm", required=True, help="the previous study's output folder (its OUT)")
    p.add_argument(
        "--init",
        default="",
        help="start each trial's backbone from: 'warm' (the previous best model) or an earlier run / checkpoint",
    )
    p.add_argument("--group-s", type=float, default=60.0, help="time bucket of a field group (camera x bucket)")
    p.add_argument("--field-test-share", type=float, default=0.2, help="share of field frames held out for test")
    p.add_argument("--field-val-share", type=float, default=0.2, help="share of field frames for validation")
    p.add_argument("--warm-top", type=int, default=3, help="previous best configurations tried first")
    return p


def prepare(own: argparse.Namespace, tuner_argv: list[str]) -> tuple[Any, FieldData, Previous]:
    """The warm study's TuneOptions, its joined data and the previous study."""
    from tuner.__main__ import parse_args, tune_options  # noqa: PLC0415 - lazy: the tuner CLI (Ray, Optuna)

    for name, lo, hi in (("field_test_share", 0.05, 0.6), ("field_val_share", 0.0, 0.6), ("group_s", 1e-3, 1e9)):
        if not lo <= getattr(own, name) <= hi:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [{lo:g}, {hi:g}], got {getattr(own, name)}")
    prev = Previous.read(own.warm)
    args = parse_args(tuner_argv)
    if "--data" in tuner_argv and args.data != prev.data:
        raise ConfigError(
            f"DATA={args.data} is not the previous study's data ({prev.data}); the warm study keeps the "
            f"previous study's exact files and splits ({prev.split_file})"
        )
    if not args.study:
        args.study = f"{prev.study}-field"
    opts = tune_options(args)
    out = Path(opts.out)
    data = build_field_data(prev, own.add, out, own.group_s, own.field_test_share, own.field_val_share, opts.seed)
    space = warm_space(prev, opts.space, warm_seeds(prev, own.warm_top), out)
    sets = list(opts.sets)
    if own.init:
        init = prev.out / "best" if own.init == "warm" else Path(own.init).resolve()
        sets.append(f"model.init={init}")
    return replace(opts, data=str(data.manifest), space=str(space), sets=tuple(sets)), data, prev


def main(argv: list[str] | None = None) -> int:

    own, rest = build_parser().parse_known_args(argv)
    setup_cli_logging(verbose=False)
    try:
        opts, data, prev = prepare(own, rest)
        print(
            f"edgetune: warm study {opts.study}: {json.dumps(data.counts())} (field groups: "
            f"{len(data.groups)}); previous best configurations first; data {data.manifest}",
            flush=True,
        )
        from tuner.field_report import compare_and_record  # noqa: PLC0415 - lazy: torch, ONNX Runtime
        from tuner.run import process_start, run_study  # noqa: PLC0415 - lazy: Ray

        summary = run_study(opts, started_at=process_start())
        failure = summary.failure() or (
            None if summary.bundle else "the study exported no bundle to compare (was --no-export given?)"
        )
        if failure:
            print(f"error: {failure}", file=sys.stderr)
            return 1
        report = compare_and_record(prev, Path(str(summary.bundle)), data, Path(opts.out))
        print(report["markdown"])
    except (ConfigError, EdgetuneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
