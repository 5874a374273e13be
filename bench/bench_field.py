"""`make bench-field`: the field loop end to end on real images with a real shift, measured.

1. home study: `python -m tuner` on the built-in textures dataset (small space bench/field_space.yaml) -> bundle;
2. serve that bundle with `--capture` (python -m edge_server) and stream the field cameras' frames (out-of-focus,
   under-exposed, noisy views of the same materials: bench/field_data.py) with the camera client (python -m
   edge_client, one stream per camera);
3. harvest the spool (python -m edge_client.harvest, admin token);
4. label at most --label-budget frames through the label page in headless Chromium, answers from the ground truth
   (bench/field_labeller.py);
5. warm study: `python -m tuner.field --add <harvest> --warm <home study> --init warm` (the same small space);
6. its report: old bundle vs new on the held-out field test groups and on the home test set.

Writes bench/results/field.json: field_acc_before/after, home_acc_before/after, captured, labelled, loop_wall_s (+
the paired intervals, counts and each stage's seconds). Target: field +10 points, home down <= 1 point, <= 200
labelled frames. Run with RAY_ADDRESS=local (the make target does)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ServerProcess, free_port, md_table, parse_args, work_dir, write_results  # noqa: E402
from field_data import SHIFT, AnswerKey, write_field  # noqa: E402
from field_labeller import label_folder  # noqa: E402

SPACE = Path(__file__).resolve().with_name("field_space.yaml")
STUDY_ARGS = [
    "--space",
    str(SPACE),
    "--trials",
    "2",
    "--epochs",
    "4",
    "--no-refit",
    "--ensemble",
    "off",
    "--time-budget",
    "0",
    "--address",
    "local",
]


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n" + "\n".join(tail))


def _stats(address: str) -> Any:
    import grpc

    from edgetune.v1 import classifier_pb2 as pb
    from edgetune.v1 import classifier_pb2_grpc as pbg

    with grpc.insecure_channel(address) as ch:
        return pbg.ClassifierStub(ch).GetStats(pb.GetStatsRequest(), timeout=10)


def serve_and_capture(bundle: Path, field_root: Path, cams: list[str], work: Path) -> dict[str, Any]:
    """Serve with capture, stream every camera, wait for the spool to be written, harvest; the server stops."""
    spool, harvest = work / "spool", work / "harvest"
    srv = ServerProcess(
        bundle,
        threads=1,
        extra=["--capture", str(spool), "--capture-max-writes-per-s", "200", "--capture-random-rate", "0.05"],
    )
    with srv:
        cmd = [
            sys.executable,
            "-m",
            "edge_client",
            "--server",
            srv.address,
            "--log",
            str(work / "client.jsonl"),
            "--quiet",
            *[a for c in cams for a in ("--source", f"{c}={field_root / c}")],
        ]
        _run(cmd, work / "client.log")
        end = time.monotonic() + 120
        while _stats(srv.address).capture.queued and time.monotonic() < end:  # a state: the queue is written
            time.sleep(0.2)
        st = _stats(srv.address)
        _run(
            [sys.executable, "-m", "edge_client.harvest", "--server", srv.address, "--out", str(harvest)],
            work / "harvest.log",
        )
        harvested = json.loads((work / "harvest.log").read_text().strip().splitlines()[-1])
        after = _stats(srv.address)
    return {
        "streamed": sum(c.frames_processed for c in st.cameras),
        "captured": dict(st.capture.captured),
        "capture_counters": dict(st.capture.counters),
        "mean_confidence": round(st.drift.mean_confidence, 4),
        "drift_total_variation": round(st.drift.total_variation, 4),
        "harvest": harvested,
        "spool_files_after_harvest": after.capture.spool_files,
        "harvest_dir": str(harvest),
    }


@dataclass(frozen=True)
class FieldRun:
    """Where this run's studies write: its work folder, the Optuna storage and the study names' tag."""

    work: Path
    storage: str
    tag: str


def home_study(run: FieldRun) -> Path:
    """Step 1: the home study on textures; returns its output folder (bundle, split.json)."""
    home = run.work / "home"
    _run(
        [
            sys.executable,
            "-m",
            "tuner",
            "--data",
            "textures",
            "--study",
            f"field-home-{run.tag}",
            "--out",
            str(home),
            "--storage",
            run.storage,
            *STUDY_ARGS,
        ],
        run.work / "home.log",
    )
    return home


def label_harvest(hdir: Path, key: AnswerKey, budget: int) -> dict[str, Any]:
    """Step 4: label the harvested frames through the label page, answers from the ground truth."""

    def answer(cid: str) -> str:
        side = json.loads((hdir / f"{cid}.json").read_text())
        return key.label(side["camera_id"], (hdir / side["frame"]).read_bytes())

    return label_folder(hdir, free_port(), answer, budget)


def warm_study(run: FieldRun, home: Path, hdir: Path) -> Path:
    """Step 5: the warm study with the labelled harvest added; returns its output folder (field_report.json)."""
    warm = run.work / "warm"
    _run(
        [
            sys.executable,
            "-m",
            "tuner.field",
            "--add",
            str(hdir),
            "--warm",
            str(home),
            "--init",
            "warm",
            "--group-s",
            "3600",
            "--field-test-share",
            "0.25",
            "--field-val-share",
            "0.1",
            "--data",
            "textures",
            "--study",
            f"field-warm-{run.tag}",
            "--out",
            str(warm),
            "--storage",
            run.storage,
            *STUDY_ARGS,
        ],
        run.work / "warm.log",
    )
    return warm


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__ or "", argv, lambda p: p.add_argument("--label-budget", type=int, default=200))
    work = work_dir(args, "edgetune-bench-field-")
    os.environ["EDGETUNE_ADMIN_TOKEN"] = secrets.token_hex(16)  # for the server and the harvest (never argv)
    run = FieldRun(work, f"sqlite:///{work / 'optuna.db'}", secrets.token_hex(3))
    stages: dict[str, float] = {}
    t0 = time.perf_counter()

    t = time.perf_counter()
    home = home_study(run)
    stages["home_study_s"] = time.perf_counter() - t

    classes = tuple(json.loads((home / "split.json").read_text())["classes"])
    frames = write_field(work / "field", classes)
    key = AnswerKey(frames)
    t_loop = time.perf_counter()
    cap = serve_and_capture(home / "bundle", work / "field", sorted(frames), work)
    stages["serve_capture_harvest_s"] = time.perf_counter() - t_loop

    t = time.perf_counter()
    hdir = Path(cap["harvest_dir"])
    lab = label_harvest(hdir, key, args.label_budget)
    stages["label_s"] = time.perf_counter() - t

    t = time.perf_counter()
    warm = warm_study(run, home, hdir)
    stages["warm_study_s"] = time.perf_counter() - t
    loop_wall = time.perf_counter() - t_loop
    rep = json.loads((warm / "field_report.json").read_text())
    payload = _payload(rep, cap, lab, loop_wall, len(frames), sum(len(v) for v in frames.values()))
    payload.update(
        stages_s={k: round(v, 1) for k, v in stages.items()},
        total_wall_s=round(time.perf_counter() - t0, 1),
        study_args=STUDY_ARGS,
        work=str(work),
    )
    write_results("field", payload, args.out, {"field loop": _table(rep)})
    ok = bool(payload["target_met"])
    return 0 if ok else 1


def _payload(
    rep: dict[str, Any], cap: dict[str, Any], lab: dict[str, Any], loop_wall: float, cameras: int, field_frames: int
) -> dict[str, Any]:
    f, h = rep["sets"]["field test"], rep["sets"]["home test"]
    head = {
        "field_acc_before": f["acc_old"],
        "field_acc_after": f["acc_new"],
        "home_acc_before": h["acc_old"],
        "home_acc_after": h["acc_new"],
        "captured": int(sum(cap["captured"].values())),
        "labelled": lab["labelled"],
        "loop_wall_s": round(loop_wall, 1),
    }
    ok = (
        head["field_acc_after"] - head["field_acc_before"] >= 0.10
        and head["home_acc_before"] - head["home_acc_after"] <= 0.01
        and head["labelled"] <= 200
    )
    return {
        **head,
        "target_met": ok,
        "target": "field +0.10, home -0.01 at most, <= 200 labelled",
        "field_test": f,
        "home_test": h,
        "shift": SHIFT,
        "cameras": cameras,
        "field_frames": field_frames,
        "capture": cap,
        "labelling": lab,
        "data": rep["data"],
        "new_bundle_parent": _parent(rep["new"]["bundle"]),
    }


def _table(rep: dict[str, Any]) -> str:
    rows = []
    for name, key in (("field (held-out cameras)", "field test"), ("home (original test split)", "home test")):
        r = rep["sets"][key]
        rows.append(
            {
                "test set": name,
                "n": r["n"],
                "before": r["acc_old"],
                "after": r["acc_new"],
                "95% paired CI of the gain": f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]",
            }
        )
    return md_table(rows, ["test set", "n", "before", "after", "95% paired CI of the gain"])


def _parent(bundle: str) -> Any:
    return json.loads((Path(bundle) / "bundle.json").read_text()).get("parent")


if __name__ == "__main__":
    sys.exit(main())
