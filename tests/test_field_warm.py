"""Warm retrain pieces (tuner/field.py, tuner/field_report.py): field frames join the previous study's data split by
camera/time groups with a held-out field test set, the previous best configurations become the first seeds, the
comparison's paired interval, and the new bundle's parent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgetune.bundle import load_bundle
from edgetune.errors import ConfigError
from fieldloop.labels import LabelStore
from tests.test_label_page import harvested
from tuner.field import Previous, assign_groups, build_field_data, warm_seeds, warm_space
from tuner.field_report import paired

SPACE = Path(__file__).resolve().parents[1] / "bench" / "field_space.yaml"


def test_groups_are_never_split_and_test_is_held_out():
    sizes = {f"cam-{k}@0": 10 + k for k in range(8)}
    out = assign_groups(sizes, test_share=0.25, val_share=0.1, seed=0)
    assert set(out) == set(sizes) and set(out.values()) == {"train", "val", "test"}
    test = sum(sizes[g] for g, s in out.items() if s == "test")
    assert 0.25 * sum(sizes.values()) <= test < 0.25 * sum(sizes.values()) + max(sizes.values())
    assert assign_groups(sizes, 0.25, 0.1, seed=0) == out  # deterministic
    with pytest.raises(ConfigError, match="at least 3"):
        assign_groups({"a@0": 5, "b@0": 5}, 0.2, 0.2, 0)


def _previous(tmp_path: Path, bundle_dir: Path, storage: str, study: str = "home") -> Previous:
    """A finished previous study's folder: tune_options.yaml, split.json (real images), bundle/."""
    import cv2

    from testkit.edge_fixtures import LABELS, texture_tiles

    out = tmp_path / "prev"
    imgs, labels = texture_tiles("train")
    files = []
    for i in range(0, len(imgs), 4):
        p = out / "data" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), imgs[i])
        files.append({"abs_path": str(p), "label": LABELS[labels[i]], "split": ("train", "val", "test")[i % 3]})
    (out / "split.json").write_text(json.dumps({"classes": list(LABELS), "files": files}))
    (out / "tune_options.yaml").write_text(yaml.safe_dump({"study": study, "storage": storage, "space": str(SPACE)}))
    shutil.copytree(bundle_dir, out / "bundle")
    return Previous.read(out)


def test_joined_manifest_keeps_home_splits_and_groups_field_frames(tmp_path, bundle_dir):
    from trainer.scan import list_csv

    prev = _previous(tmp_path, bundle_dir, "sqlite:///x.db")
    add = tmp_path / "harvest"
    recs = harvested(add, n=12)
    store = LabelStore(add)
    for i, r in enumerate(recs):
        store.decide(r.id, ("brick", "grass", "gravel")[i % 3])
    # 12 frames of two cameras over 12 s: 1-s buckets give 12 groups
    data = build_field_data(prev, add, tmp_path / "warm", group_s=2.0, test_share=0.25, val_share=0.2)
    files, rejected = list_csv(data.manifest)
    assert not rejected and len(files) == len(data.rows)
    home = json.loads(prev.split_file.read_text())["files"]
    by_path = {f.path: f.split for f in files}
    assert all(by_path[str(Path(h["abs_path"]).resolve())] == h["split"] for h in home)  # home splits unchanged
    field = [r for r in data.rows if r.source == "field"]
    assert len(field) == 12 and {r.split for r in field} == {"train", "val", "test"}
    for r in field:  # every frame's group sits on one side only
        assert data.groups[f"{r.camera_id}@{int(float(r.time_unix) // 2.0)}"] == r.split
    assert len(data.subset("field", "test")) >= 3
    skipped = tmp_path / "skipped"
    harvested(skipped, n=3)
    s = LabelStore(skipped)
    s.decide(s.order[0], "skip")
    with pytest.raises(ConfigError, match="lists no labelled frame"):
        build_field_data(prev, skipped, tmp_path / "w2")


def test_previous_best_configurations_come_first(tmp_path, bundle_dir):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="home", storage=storage, direction="maximize")
    for lr, value in ((0.001, 0.7), (0.004, 0.9), (0.002, 0.8)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"backbone": "efficientnet_lite0", "img": 96, "freeze": 0.5, "lr": lr, "augment": "flips"},
                distributions={
                    "backbone": optuna.distributions.CategoricalDistribution(["efficientnet_lite0"]),
                    "img": optuna.distributions.CategoricalDistribution([96]),
                    "freeze": optuna.distributions.CategoricalDistribution([0.5, 0.75]),
                    "lr": optuna.distributions.FloatDistribution(1e-3, 5e-3, log=True),
                    "augment": optuna.distributions.CategoricalDistribution(["flips", "none"]),
                },
                value=value,
            )
        )
    prev = _previous(tmp_path, bundle_dir, storage)
    seeds = warm_seeds(prev, top=2)
    assert [s["params"]["lr"] for s in seeds] == [0.004, 0.002]
    path = warm_space(prev, "", seeds, tmp_path / "warm")
    from tuner.space import load_space

    space = load_space(path)
    firsts = [p["lr"] for p in space.points_to_evaluate()]
    assert firsts == [0.004, 0.002]  # the space's own seed (lr 0.002) is the second warm one: not tried twice


def test_paired_interval_and_parent_record(tmp_path, bundle_dir):
    from trainer.export import record_parent

    old = np.array([True] * 40 + [False] * 60)
    new = np.array([True] * 90 + [False] * 10)
    r = paired(old, new)
    assert r["diff"] == pytest.approx(0.5) and r["ci95"][0] > 0.3 and r["old_wrong_new_right"] == 50
    b = shutil.copytree(bundle_dir, tmp_path / "new")
    record_parent(b, {"bundle_sha256": "a" * 64, "model_version": "a" * 12, "path": "/x", "study": "home"})
    assert load_bundle(b).meta["parent"]["study"] == "home"


def test_cli_refuses_other_data_and_missing_previous_study(tmp_path, bundle_dir, capsys):
    from tuner.field import main

    prev = _previous(tmp_path, bundle_dir, "sqlite:///x.db")
    (prev.out / "tune_options.yaml").write_text(
        yaml.safe_dump({"study": "home", "storage": "sqlite:///x.db", "space": str(SPACE), "data": "textures"})
    )
    add = tmp_path / "harvest"
    harvested(add, n=3)
    assert main(["--add", str(add), "--warm", str(prev.out), "--data", "elpv"]) == 2
    assert "not the previous study's data (textures)" in capsys.readouterr().err
    assert main(["--add", str(add), "--warm", str(tmp_path / "nowhere")]) == 2
    assert "not a finished study's output folder" in capsys.readouterr().err
