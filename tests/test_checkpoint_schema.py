"""checkpoint.json / model.pt metadata: one versioned schema, one writer (save_checkpoint), one reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.preprocess import PreprocessSpec
from trainer.checkpoint import (
    CHECKPOINT_SCHEMA_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)


def _write(d: Path) -> Path:
    return save_checkpoint(
        d,
        torch.nn.Linear(3, 2),
        {"model": {"backbone": "tiny"}},
        ["a", "b"],
        PreprocessSpec(),
        epoch=2,
        metrics={"val_acc": torch.tensor(0.5)},
    )


def test_written_with_schema_version_and_read_back(tmp_path: Path) -> None:
    d = _write(tmp_path / "ck")
    on_disk = json.loads((d / META_FILE).read_text())
    assert on_disk["schema_version"] == CHECKPOINT_SCHEMA_VERSION == 2 and "format_version" not in on_disk
    meta = read_meta(d)
    assert meta["classes"] == ["a", "b"] and meta["epoch"] == 2 and meta["metrics"] == {"val_acc": 0.5}
    assert load_checkpoint(d)["meta"] == meta


def _rewrite(d: Path, edit) -> None:  # both copies of the metadata: the JSON and the one inside model.pt
    meta = json.loads((d / META_FILE).read_text())
    edit(meta)
    (d / META_FILE).write_text(json.dumps(meta))
    ck = torch.load(d / WEIGHTS_FILE, weights_only=True)
    edit(ck["meta"])
    torch.save(ck, d / WEIGHTS_FILE)


def test_schema_1_checkpoint_is_migrated(tmp_path: Path) -> None:
    d = _write(tmp_path / "ck")

    def to_v1(m: dict) -> None:
        m.pop("schema_version")
        m["format_version"] = 1

    _rewrite(d, to_v1)
    for meta in (read_meta(d), load_checkpoint(d)["meta"]):
        assert meta["schema_version"] == CHECKPOINT_SCHEMA_VERSION and "format_version" not in meta


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m.update(schema_version=99),
            r"checkpoint schema_version 99 is not supported.*reads checkpoint schema_version 2",
        ),
        (lambda m: m.pop("schema_version"), r"checkpoint schema_version None is not supported"),
        (lambda m: m.pop("classes"), r"checkpoint metadata lacks \['classes'\]"),
    ],
)
def test_unknown_schema_or_missing_fields_are_refused(tmp_path: Path, edit, message: str) -> None:
    d = _write(tmp_path / "ck")
    _rewrite(d, edit)
    with pytest.raises(EdgetuneError, match=message):
        read_meta(d)
    with pytest.raises(EdgetuneError, match=message):
        load_checkpoint(d)
