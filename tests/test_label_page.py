"""Labelling harvested frames: the label store (decisions, undo, labels.csv the trainer reads), the page's HTTP
guard, Label Studio export/import, and the page itself in a real headless Chromium driven by key presses."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
from pathlib import Path

import pytest

from edgetune.capture_record import CaptureRecord, new_capture_id
from edgetune.errors import ConfigError
from fieldloop.label import LabelServer
from fieldloop.labels import LABELS_CSV, LabelStore, read_labels_csv
from fieldloop.labelstudio import NONE_CHOICE, export_tasks, import_annotations, labeling_config
from testkit.edge_fixtures import LABELS, encode_png, texture_tiles


def harvested(folder: Path, n: int = 6) -> list[CaptureRecord]:
    """A harvested folder of ``n`` real texture tiles with capture records (as make harvest leaves it)."""
    folder.mkdir(parents=True, exist_ok=True)
    imgs, labels = texture_tiles("test")
    step = max(1, len(imgs) // n)
    recs = []
    for k in range(n):
        data = encode_png(imgs[k * step])
        cid = new_capture_id(1_700_000_000_000_000_000 + k)
        probs = [0.2, 0.2, 0.2]
        probs[(labels[k * step] + 1) % 3] = 0.6  # the model is wrong and unsure: worth labelling
        rec = CaptureRecord(
            id=cid,
            frame=cid + ".png",
            frame_sha256=hashlib.sha256(data).hexdigest(),
            frame_bytes=len(data),
            camera_id=f"cam-{k % 2}",
            time_unix=1_700_000_000.0 + k,
            capture_time_us=0,
            frame_id=k,
            model_version="abc123",
            bundle_sha256="e" * 64,
            labels=LABELS,
            probs=tuple(probs),
            reason="low_confidence",
        )
        (folder / rec.frame).write_bytes(data)
        (folder / f"{cid}.json").write_text(rec.to_json())
        recs.append(rec)
    return recs


def test_store_decisions_undo_and_manifest_the_trainer_reads(tmp_path):
    from trainer.scan import list_csv

    recs = harvested(tmp_path)
    store = LabelStore(tmp_path)
    assert store.classes == LABELS and store.next_id() == recs[0].id
    store.decide(recs[0].id, "grass")
    store.decide(recs[1].id, "skip")
    store.decide(recs[2].id, "none")
    store.decide(recs[3].id, "brick")
    assert store.undo().decision == "brick"
    assert store.progress() == {"total": 6, "labelled": 1, "none": 1, "skipped": 1, "remaining": 3}
    with pytest.raises(ConfigError, match="not one of the classes"):
        store.decide(recs[3].id, "granite")
    rows = read_labels_csv(tmp_path / LABELS_CSV)
    assert [(r["path"], r["label"], r["capture_id"], r["camera_id"]) for r in rows] == [
        (recs[0].frame, "grass", recs[0].id, "cam-0")
    ]
    files, rejected = list_csv(tmp_path / LABELS_CSV)
    assert [(Path(f.path).name, f.label) for f in files] == [(recs[0].frame, "grass")] and not rejected
    again = LabelStore(tmp_path)  # decisions survive a restart of the page
    assert again.progress() == store.progress() and again.next_id() == recs[3].id


def _http(
    srv: LabelServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    host: str | None = None,
) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    h = {"Host": host or f"127.0.0.1:{srv.server_address[1]}", **(headers or {})}
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    return r.status, r.read()


def test_page_http_guard(tmp_path):
    recs = harvested(tmp_path / "h")
    (tmp_path / "secret.png").write_bytes(b"secret")
    srv = LabelServer(LabelStore(tmp_path / "h")).start()
    try:
        assert srv.server_address[0] == "127.0.0.1"
        assert _http(srv, "GET", "/")[0] == 200
        assert _http(srv, "GET", "/", host="evil.example:80")[0] == 403  # DNS rebinding
        body = json.dumps({"id": recs[0].id, "decision": "brick"}).encode()
        assert _http(srv, "POST", "/api/decide", body)[0] == 403  # no page header: another origin
        for bad in ("/frame/../secret.png", "/frame/%2e%2e%2fsecret.png", f"/frame/{recs[0].id}.png"):
            assert _http(srv, "GET", bad)[0] == 404
        code, data = _http(srv, "GET", f"/frame/{recs[0].id}")
        assert code == 200 and data == (tmp_path / "h" / recs[0].frame).read_bytes()
        hdr = {"X-Edgetune-Label": "1", "Content-Type": "application/json"}
        assert _http(srv, "POST", "/api/decide", b"x" * 5000, hdr)[0] == 400
        code, data = _http(srv, "POST", "/api/decide", body, hdr)
        assert code == 200 and json.loads(data)["progress"]["labelled"] == 1
    finally:
        srv.shutdown()
        srv.server_close()


def test_label_studio_export_and_import(tmp_path):
    recs = harvested(tmp_path)
    store = LabelStore(tmp_path)
    tasks = export_tasks(store)
    assert len(tasks) == 6 and tasks[0]["data"]["image"] == "/data/local-files/?d=" + recs[0].frame
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [recs[0].top[0][0]]
    assert 'toName="image"' in labeling_config(store.classes) and NONE_CHOICE in labeling_config(store.classes)

    def ann(choice, cancelled=False):
        return {
            "was_cancelled": cancelled,
            "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}],
        }

    export = [
        dict(tasks[0], annotations=[ann("gravel")]),
        dict(tasks[1], annotations=[ann(NONE_CHOICE)]),
        dict(tasks[2], annotations=[ann("grass", cancelled=True)]),
        {"data": {"capture_id": "x"}},
    ]
    assert import_annotations(store, export) == {"imported": 2, "unannotated": 1, "unknown_frame": 1}
    rows = read_labels_csv(tmp_path / LABELS_CSV)
    assert [(r["capture_id"], r["label"], r["labelled_by"]) for r in rows] == [(recs[0].id, "gravel", "labelstudio")]
    with pytest.raises(ConfigError, match="not one of"):
        import_annotations(store, [dict(tasks[3], annotations=[ann("granite")])])
    json_min = [{"image": tasks[4]["data"]["image"], "capture_id": recs[4].id, "label": "brick", "id": 5}]
    assert import_annotations(store, json_min)["imported"] == 1  # Label Studio's JSON-MIN export
    assert read_labels_csv(tmp_path / LABELS_CSV)[-1]["capture_id"] == recs[4].id


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium): the page is not tested in a browser")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    return exe


def test_label_page_in_headless_chromium_by_key_presses(tmp_path):
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    recs = harvested(tmp_path, n=5)
    srv = LabelServer(LabelStore(tmp_path)).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"], headless=True)
            page = browser.new_page(bypass_csp=True)  # Playwright evaluates its waits as strings; the page has none
            page.goto(srv.url)
            frame = page.locator("#frame")

            def shows(i: int) -> None:  # wait for a state: the page shows frame i
                page.wait_for_function(
                    f"document.getElementById('frame').dataset.id === '{recs[i].id}'", timeout=15_000
                )

            shows(0)
            assert page.locator("#top3 .top").count() == 3
            assert "60.0 %" in page.locator("#top3").inner_text()
            for key, nxt in (("1", 1), ("3", 2), ("s", 3), ("n", 4), ("u", 3), ("2", 4)):
                page.keyboard.press(key)
                shows(nxt)
            page.keyboard.press("1")
            page.wait_for_function("document.getElementById('progress').dataset.remaining === '0'", timeout=15_000)
            assert frame.is_hidden() and "4 labelled, 0 none, 1 skipped" in page.locator("#progress").inner_text()
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    rows = read_labels_csv(tmp_path / LABELS_CSV)
    assert [(r["capture_id"], r["label"]) for r in rows] == [
        (recs[0].id, "brick"),
        (recs[1].id, "gravel"),
        (recs[3].id, "grass"),
        (recs[4].id, "brick"),
    ]
    state = json.loads((tmp_path / "labelling.json").read_text())
    assert [d["decision"] for d in state["decisions"]] == ["brick", "gravel", "skip", "grass", "brick"]
