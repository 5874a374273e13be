"""Label Studio interop without a Label Studio server: export a harvested folder as Label Studio tasks (its JSON
import format, with the edge model's top-1 as a prediction and a labeling config), and import the annotations it
exports (its JSON and JSON-MIN export formats) as decisions of :class:`~fieldloop.labels.LabelStore` (``labelled_by``
``labelstudio``), which writes the same ``labels.csv`` as the page.

    python -m fieldloop.labelstudio export --dir DIR --out tasks.json   # + tasks.config.xml
    python -m fieldloop.labelstudio import --dir DIR --annotations export.json

Task images default to Label Studio's local-files URL (``/data/local-files/?d=<prefix><frame>``; serve DIR with
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``); ``--image-prefix`` changes what goes before the file name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from edgetune.dataclass_cli import add_version
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.fsutil import atomic_write_text
from fieldloop.labels import NONE, LabelStore

FROM_NAME, TO_NAME = "label", "image"
#: The choice a Label Studio annotator picks for a frame of none of the classes.
NONE_CHOICE = "none of these"


def labeling_config(classes: tuple[str, ...]) -> str:
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in (*classes, NONE_CHOICE))
    return (
        f'<View><Image name="{TO_NAME}" value="$image"/>'
        f'<Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInLine="true">{choices}</Choices>'
        "</View>\n"
    )


def export_tasks(store: LabelStore, image_prefix: str = "/data/local-files/?d=") -> list[dict[str, Any]]:
    tasks = []
    for n, cid in enumerate(store.order, start=1):
        r = store.records[cid]
        top_label, top_p = r.top[0]
        tasks.append(
            {
                "id": n,
                "data": {
                    "image": image_prefix + r.frame,
                    "capture_id": r.id,
                    "camera_id": r.camera_id,
                    "time_unix": r.time_unix,
                    "reason": r.reason,
                    "model_version": r.model_version,
                },
                "predictions": [
                    {
                        "model_version": r.model_version,
                        "score": round(top_p, 6),
                        "result": [
                            {
                                "from_name": FROM_NAME,
                                "to_name": TO_NAME,
                                "type": "choices",
                                "value": {"choices": [top_label]},
                            }
                        ],
                    }
                ],
            }
        )
    return tasks


def _choice(task: dict[str, Any]) -> str | None:
    """The last submitted (not cancelled) annotation's choice of a task (JSON export), or the ``label`` column of a
    JSON-MIN export row; None when not annotated."""
    if "annotations" not in task and FROM_NAME in task:  # JSON-MIN: {"label": "grass" | {"choices": [...]}, ...}
        v = task[FROM_NAME]
        got = v.get("choices") if isinstance(v, dict) else [v]
        return str(got[0]) if got and got[0] else None
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    for ann in reversed(anns):
        for res in ann.get("result") or []:
            if isinstance(res, dict) and res.get("type") == "choices":
                got = (res.get("value") or {}).get("choices") or []
                if got:
                    return str(got[0])
    return None


def import_annotations(store: LabelStore, tasks: Any) -> dict[str, int]:
    """Record the annotations of Label Studio's JSON export; returns counts (imported, unannotated, unknown)."""
    if not isinstance(tasks, list):
        raise ConfigError("a Label Studio JSON export is a list of tasks")
    counts = {"imported": 0, "unannotated": 0, "unknown_frame": 0}
    for t in tasks:
        if not isinstance(t, dict):
            counts["unknown_frame"] += 1
            continue
        cid = (t.get("data") or {}).get("capture_id") or t.get("capture_id")  # JSON export / JSON-MIN
        if cid not in store.records:
            counts["unknown_frame"] += 1
            continue
        choice = _choice(t)
        if choice is None:
            counts["unannotated"] += 1
            continue
        decision = NONE if choice == NONE_CHOICE else choice
        if decision != NONE and decision not in store.classes:
            raise ConfigError(
                f"task {t.get('id')}: choice {choice!r} is not one of {list(store.classes)} or {NONE_CHOICE!r}"
            )
        store.decide(cid, decision, by="labelstudio")
        counts["imported"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fieldloop.labelstudio", description="Label Studio JSON interop")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="harvested folder -> Label Studio tasks (+ <out>.config.xml)")
    e.add_argument("--dir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--image-prefix", default="/data/local-files/?d=")
    i = sub.add_parser("import", help="Label Studio JSON export -> labels.csv of the folder")
    i.add_argument("--dir", required=True)
    i.add_argument("--annotations", required=True)
    args = p.parse_args(argv)
    try:
        store = LabelStore(args.dir)
        if args.cmd == "export":
            out = Path(args.out)
            atomic_write_text(out, json.dumps(export_tasks(store, args.image_prefix), indent=1))
            atomic_write_text(out.with_suffix(".config.xml"), labeling_config(store.classes))
            print(json.dumps({"tasks": len(store.order), "out": str(out)}))
        else:
            try:
                tasks = json.loads(Path(args.annotations).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ConfigError(f"cannot read {args.annotations}: {err}") from None
            print(json.dumps(import_annotations(store, tasks)))
    except EdgetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
