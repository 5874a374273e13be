"""The labeller of `make bench-field`: the label page (``python -m fieldloop.label``, a real server process) driven
in headless Chromium by key presses, with answers from the bench's answer key — the page's own interface, as an
engineer would use it. Without Chromium or Playwright the same page's JSON API is used instead (and the result
says so)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _wait_page(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"make label exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "api/state", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the label page {url} did not answer within {timeout} s")


def _state(url: str) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(url + "api/state", timeout=10).read())


def label_folder(folder: Path, port: int, answer: Any, limit: int) -> dict[str, Any]:
    """Label up to ``limit`` frames of ``folder``; ``answer(record_id) -> class``. Returns how it went."""
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fieldloop.label", "--dir", str(folder), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_page(url, proc)
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if importlib.util.find_spec("playwright") is None:
            exe = None
        t0 = time.perf_counter()
        n = _by_keys(url, exe, answer, limit) if exe else _by_api(url, answer, limit)
        return {
            "labelled": n,
            "via": "chromium key presses" if exe else "page JSON API (no Chromium/Playwright)",
            "label_s": round(time.perf_counter() - t0, 2),
            "progress": _state(url)["progress"],
        }
    finally:
        proc.terminate()
        proc.wait(10)


def _by_keys(url: str, exe: str, answer: Any, limit: int) -> int:
    from playwright.sync_api import sync_playwright

    done = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"], headless=True)
        page = browser.new_page(bypass_csp=True)
        page.goto(url)
        page.wait_for_function("document.getElementById('progress').dataset.total !== '0'", timeout=30_000)
        keys = None
        last = ""
        while done < limit:
            page.wait_for_function(f"document.getElementById('frame').dataset.id !== '{last}'", timeout=30_000)
            cid = page.locator("#frame").get_attribute("data-id") or ""
            if not cid:
                break
            if keys is None:
                st = _state(url)
                keys = dict(zip(st["classes"], st["keys"], strict=True))
            page.keyboard.press(keys[answer(cid)])
            done += 1
            last = cid
        page.wait_for_function(f"document.getElementById('progress').dataset.labelled === '{done}'", timeout=30_000)
        browser.close()
    return done


def _by_api(url: str, answer: Any, limit: int) -> int:
    done = 0
    while done < limit:
        item = _state(url)["item"]
        if item is None:
            break
        body = json.dumps({"id": item["id"], "decision": answer(item["id"])}).encode()
        req = urllib.request.Request(
            url + "api/decide",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "X-Edgetune-Label": "1"},
        )
        urllib.request.urlopen(req, timeout=10).read()
        done += 1
    return done
