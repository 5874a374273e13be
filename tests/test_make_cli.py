"""The Makefile and the CLIs as a person meets them: ``make report`` with no arguments lists the studies of the
storage, make never shows a PostgreSQL password, ``make proto-check`` tells fresh stubs from stale ones, and every
CLI's ``--help`` shows its defaults and names only README sections that exist."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: make with the venv stamp left out (the venv is the one running the tests) and this interpreter as $(PY)
MAKE = ["make", "--no-print-directory", "STAMP=", f"PY={sys.executable}"]
#: the environment of a make started here: without the flags of a make that runs this suite (`make -s test-stress`
#: exports MAKEFLAGS=s, and a silent make shows nothing of what these tests look at)
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def _make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=MAKE_ENV)


def test_make_report_without_studies_lists_the_storage(tmp_path):
    import optuna

    from tuner.device import CACHE_STUDY

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name, values in (("tex-a", [0.5, 0.7]), ("elpv-b", [0.4])):
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        study.set_user_attr("dataset", name.split("-")[0])
        for v in values:
            study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=v))
    optuna.create_study(study_name=CACHE_STUDY, storage=storage)  # timings, not trials: not listed
    r = _make("-s", "report", f"STORAGE={storage}")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"study", "elpv-b", "tex-a"}, r.stdout
    assert "| 2 | 0.7000 |" in rows["tex-a"] and "| tex |" in rows["tex-a"], rows["tex-a"]
    assert "make report STUDIES=elpv-b,tex-a" in r.stdout


def test_make_report_without_a_storage_says_so(tmp_path):
    r = _make("-s", "report", f"STORAGE=sqlite:///{tmp_path / 'none.db'}")
    assert r.returncode != 0 and "no study storage" in r.stderr and "make tune" in r.stderr
    assert not (tmp_path / "none.db").exists()  # looking did not create one


@pytest.mark.parametrize(
    "target, extra",
    [("tune", []), ("dashboard", []), ("report", []), ("report", ["STUDIES=a,b"]), ("tune", ["ARGS=--storage {url}"])],
)
def test_make_never_echoes_a_postgresql_password(target, extra):
    url = "postgresql://edgetune:s3cr3t-pw@db.example:5432/studies"
    args = [a.format(url=url) for a in extra]
    # PY=true: the command itself does nothing; what make shows of it is the point
    r = subprocess.run(
        ["make", "--no-print-directory", "STAMP=", "PY=true", target, f"STORAGE={url}", *args],
        cwd=ROOT,
        env=MAKE_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = r.stdout + r.stderr
    assert r.returncode == 0, shown
    assert "s3cr3t" not in shown, shown
    assert "postgresql://edgetune:***@db.example:5432/studies" in shown, shown


def test_make_proto_check_tells_fresh_from_stale(tmp_path):
    r = _make("proto-check")
    assert r.returncode == 0 and "match" in r.stdout, r.stdout + r.stderr
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copytree(ROOT / "edgetune" / "v1", copy / "edgetune" / "v1")
    shutil.copy(ROOT / "Makefile", copy / "Makefile")
    stub = copy / "edgetune" / "v1" / "classifier_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    r = _make("proto-check", cwd=copy)
    assert r.returncode != 0 and "classifier_pb2.py" in r.stdout and "make proto" in r.stdout, r.stdout + r.stderr


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from edge_client.__main__ import build_parser as client
    from edge_server.__main__ import build_parser as serve
    from edge_server.agent.node import build_parser as edge_node
    from edge_server.engine.build import build_parser as engine
    from trainer.__main__ import build_parser as train
    from trainer.export import build_parser as export
    from tuner.__main__ import build_parser as tune
    from tuner.dashboard import build_parser as dashboard
    from tuner.report import build_parser as report
    from tuner.studies import build_parser as studies

    out = {
        "tune": tune(),
        "train": train(),
        "export": export(),
        "serve": serve(),
        "engine": engine(),
        "client": client(),
        "dashboard": dashboard(),
        "studies": studies(),
        "report": report(),
    }
    node = edge_node()
    out["edge-node"] = node
    for a in node._actions:
        if isinstance(a, argparse._SubParsersAction):
            out |= {f"edge-node {k}": v for k, v in a.choices.items()}
    return out


def _stated_default(action: argparse.Action) -> str | None:
    """The text an option's help must show for its default, or None where there is nothing to show."""
    d = action.default
    if not action.option_strings or action.nargs == 0 or d is None or d is argparse.SUPPRESS:
        return None
    if isinstance(d, (str, tuple, list, dict)) and not d:
        return None
    return ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_help_shows_every_default(name):
    parser = _parsers()[name]
    # argparse wraps long lines, also at a hyphen inside a path ("fresh-check" -> "fresh-\ncheck"): compare with
    # all whitespace removed
    text = "".join(parser.format_help().split())
    for action in parser._actions:
        want = _stated_default(action)
        if want is None:
            continue
        assert action.help, f"{name}: {action.option_strings[0]} has no help text"
        helped = " ".join(action.help.split())
        assert "default" in helped.lower() or f"(default:{''.join(want.split())})" in text, (
            f"{name} --help does not show the default of {action.option_strings[0]} ({want})"
        )


def _readme_sections() -> set[str]:
    titles = set()
    for readme in ROOT.rglob("README.md"):
        if ".venv" in readme.parts:
            continue
        text = readme.read_text()
        titles |= {m.strip() for m in re.findall(r"^#+\s+(.+)$", text, re.M)}
        titles |= {m.strip() for m in re.findall(r"\*\*([^*]+?)\.?\*\*", text)}  # a paragraph's bold lead-in
    return titles


def test_help_names_only_readme_sections_that_exist():
    sections = _readme_sections()
    named = []
    for name, parser in _parsers().items():
        text = " ".join(parser.format_help().split())
        for title in re.findall(r"README(?:\.md)?,? (?:section )?['\"]([^'\"]+)['\"]", text):
            named.append(title)
            assert any(s.startswith(title) for s in sections), f"{name} --help names README section {title!r}"
        for title in re.findall(r"its (\w[\w -]*) paragraph", text):
            assert title in sections, f"{name} --help names README paragraph {title!r}"
    assert named, "no CLI names a README section (the test would check nothing)"
