"""One definition per choice list (issue #12): each list lives in the module that owns the concept, every CLI's
``choices=`` *is* that constant, and no second literal copy of a list exists anywhere in the packages."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edgetune", "trainer", "tuner", "edge_server", "edge_client")

#: (owning module, constant): the one definition of each choice list. Derived ones (built from another
#: constant, no literal of their own) are in DERIVED.
OWNED = [
    ("trainer.datasets", "ELPV_TASKS"),
    ("trainer.datasets", "BUILTINS"),
    ("trainer.config", "AUG_PRESETS"),
    ("trainer.config", "OPTIMIZERS"),
    ("trainer.config", "SCHEDULES"),
    ("trainer.config", "HEADS"),
    ("trainer.config", "SAMPLERS"),
    ("trainer.config", "BN_STATS"),
    ("trainer.config", "EXPANSIONS"),
    ("trainer.actcache", "VIEWS"),
    ("trainer.actcache", "VIEW_SETS"),  # its keys: the augmentations the activation cache can serve
    ("trainer.ray_trainer", "PLACEMENT_STRATEGIES"),
    ("tuner.space", "TYPES"),
    ("edge_server.runners", "BACKENDS"),
    ("edgetune.device", "PRECISIONS"),
    ("edgetune.device", "TIMING_BACKENDS"),
    ("edge_server.model", "BATCH_WAITS"),
    ("edge_server.logs", "LOG_LEVELS"),
    ("edge_client.output", "LOG_FORMATS"),
]
DERIVED = [
    ("trainer.metric", "METRIC_NAMES"),  # = tuple(METRICS), each a Metric("<name>", ...) in trainer/metric.py
    ("edgetune.device", "PRECISION_CHOICES"),  # = ("auto", *PRECISIONS)
]


def _const(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _values(v: Any) -> frozenset[Any]:
    return frozenset(v.keys() if isinstance(v, dict) else v)


# -- (a) every CLI's choices are the owning constant ----------------------------------------------------------------
def _parsers() -> dict[str, Any]:
    import edge_client.__main__ as client_cli
    import edge_server.__main__ as server_cli
    import edge_server.engine.build as engine_cli
    import trainer.__main__ as train_cli
    import tuner.__main__ as tune_cli

    return {
        "tuner": tune_cli.build_parser(),
        "trainer": train_cli.build_parser(),
        "edge_server": server_cli.build_parser(),
        "edge_server.engine": engine_cli.build_parser(),
        "edge_client": client_cli.build_parser(),
    }


#: (CLI, argparse dest) -> the constant its choices must be (identity, not just equality).
CLI_CHOICES = {
    ("tuner", "placement_strategy"): ("trainer.ray_trainer", "PLACEMENT_STRATEGIES"),
    ("tuner", "timing_backend"): ("edgetune.device", "TIMING_BACKENDS"),
    ("tuner", "metric"): ("trainer.metric", "METRIC_NAMES"),
    ("edge_server", "backend"): ("edge_server.runners", "BACKENDS"),
    ("edge_server", "precision"): ("edgetune.device", "PRECISIONS"),
    ("edge_server", "batch_wait"): ("edge_server.model", "BATCH_WAITS"),
    ("edge_server", "log_level"): ("edge_server.logs", "LOG_LEVELS"),
    ("edge_server", "profile"): ("edge_server.profiles", "PROFILE_NAMES"),
    ("edge_server.engine", "precision"): ("edgetune.device", "PRECISION_CHOICES"),
    ("edge_client", "log_format"): ("edge_client.output", "LOG_FORMATS"),
}


def test_cli_choices_are_the_owning_constants():
    found = {}
    for cli, parser in _parsers().items():
        for action in parser._actions:  # argparse has no public accessor for its actions
            if action.choices is not None:
                found[(cli, action.dest)] = action.choices
    assert set(found) == set(CLI_CHOICES), "a CLI flag with choices is missing here, or a listed one is gone"
    for where, (module, name) in CLI_CHOICES.items():
        assert found[where] is _const(module, name), f"{where}: choices must be {module}.{name}, not a copy"


def test_validators_accept_exactly_the_owned_lists():
    """The config validators and the CLI-facing option classes read the same constants the CLIs offer."""
    from edge_server.model import BATCH_WAITS, RunnerOptions
    from edgetune.errors import ConfigError
    from trainer.config import TrainConfig
    from trainer.datasets import ELPV_TASKS
    from trainer.metric import METRIC_NAMES
    from trainer.ray_trainer import PLACEMENT_STRATEGIES
    from tuner.options import TuneOptions

    for task in ELPV_TASKS:
        assert TrainConfig.from_dict({"data": {"elpv_task": task}}).data.elpv_task == task
    with pytest.raises(ConfigError, match=r"data.elpv_task must be one of \['defect4', 'binary', 'type'\]"):
        TrainConfig.from_dict({"data": {"elpv_task": "nope"}})
    for w in BATCH_WAITS:
        assert RunnerOptions(batch_wait=w).batch_wait == w
    with pytest.raises(ConfigError, match="batch_wait must be 'adaptive' or 'fixed'"):
        RunnerOptions(batch_wait="sometimes")
    for s in PLACEMENT_STRATEGIES:
        assert TuneOptions(out="/tmp/edgetune-choices", storage="sqlite:///:memory:", placement_strategy=s)
    for m in METRIC_NAMES:
        assert TrainConfig.from_dict({"metric": m}).metric == m


def test_default_space_choices_lie_within_the_config_lists():
    """The default search space only offers values the trainer accepts (it searches subsets of the lists)."""
    from trainer import config
    from tuner.space import load_space

    lists = {"data.augment": config.AUG_PRESETS, "optim.optimizer": config.OPTIMIZERS, "model.head": config.HEADS}
    space = load_space()
    checked = [p.key for p in space.params.values() if p.key in lists]
    assert sorted(checked) == sorted(lists)
    for p in space.params.values():
        if p.key in lists:
            assert set(p.choices) <= set(lists[p.key]), (p.name, p.choices)


# -- (b) no second literal copy of a list -------------------------------------------------------------------------
def _literal(node: ast.AST) -> tuple[frozenset[Any], ...]:
    """The value sets a node spells out literally: a tuple/list/set of constants, the keys of a dict literal."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        elts = node.elts
    elif isinstance(node, ast.Dict):
        elts = [k for k in node.keys if k is not None]
        if len(elts) != len(node.keys):
            return ()
    else:
        return ()
    if len(elts) < 2 or not all(isinstance(e, ast.Constant) for e in elts):
        return ()
    return (frozenset(e.value for e in elts if isinstance(e, ast.Constant)),)


Hits = dict[frozenset[Any], list[str]]


def _scan() -> tuple[Hits, dict[str, list[str]], dict[str, int]]:
    """(value set -> ["file:line"] of every literal spelling it out, with " in <function>" inside a function;
    metric name -> ["file:line"] of each ``Metric("<name>", ...)`` call; "module.NAME" -> line of its module-level
    assignment)."""
    literals: Hits = {}
    metric_calls: dict[str, list[str]] = {}
    assigns: dict[str, int] = {}
    files = sorted(f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py") if "_pb2" not in f.name)
    assert len(files) > 50

    class Visitor(ast.NodeVisitor):
        def __init__(self, rel: Path) -> None:
            self.rel, self.func = rel, ""

        def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
            outer, self.func = self.func, node.name
            self.generic_visit(node)
            self.func = outer

        visit_AsyncFunctionDef = visit_FunctionDef

        def generic_visit(self, node: ast.AST) -> None:
            where = f"{self.rel}:{getattr(node, 'lineno', 0)}" + (f" in {self.func}" if self.func else "")
            for values in _literal(node):
                literals.setdefault(values, []).append(where)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "Metric"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                metric_calls.setdefault(str(node.args[0].value), []).append(where)
            super().generic_visit(node)

    for f in files:
        rel = f.relative_to(REPO)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(f.read_text(), str(f))
        Visitor(rel).visit(tree)
        for node in tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for t in targets:
                if isinstance(t, ast.Name):
                    assigns[f"{module}.{t.id}"] = node.lineno
    return literals, metric_calls, assigns


@pytest.fixture(scope="module")
def scanned() -> tuple[Hits, dict[str, list[str]], dict[str, int]]:
    return _scan()


@pytest.mark.parametrize("module,name", OWNED, ids=[n for _, n in OWNED])
def test_each_list_is_spelled_out_once_at_its_owner(scanned, module, name):
    literals, _, assigns = scanned
    where = f"{module.replace('.', '/')}{'/__init__' if module == 'edge_server.runners' else ''}.py"
    line = assigns.get(f"{module}.{name}")
    assert line is not None, f"{module}.{name} is not assigned at module level"
    hits = literals.get(_values(_const(module, name)), [])
    assert hits == [f"{where}:{line}"], f"{module}.{name} must be the one literal of its values; found {hits}"


@pytest.mark.parametrize("module,name", DERIVED, ids=[n for _, n in DERIVED])
def test_derived_lists_have_no_literal_copy(scanned, module, name):
    literals, _, assigns = scanned
    assert f"{module}.{name}" in assigns
    values = _values(_const(module, name))
    assert len(values) >= 3
    hits = [h for h in literals.get(values, []) if _place(h) not in PRODUCERS]
    assert hits == [], f"a literal copy of {module}.{name}: {hits}"


def _place(hit: str) -> tuple[str, str]:
    """ "trainer/loop.py:412 in validate" -> ("trainer/loop.py", "validate")."""
    return hit.split(":")[0], hit.partition(" in ")[2]


#: (file, function) of the one place allowed to spell out a derived list: the dict that computes each metric's
#: value from the validation pass (a metric is a key it produces).
PRODUCERS = {("trainer/loop.py", "_validate_model")}


def test_the_metric_producer_is_the_only_literal_of_the_metric_names(scanned):
    from trainer.metric import METRIC_NAMES

    literals, _, _ = scanned
    hits = literals.get(frozenset(METRIC_NAMES), [])
    assert [_place(h) for h in hits] == sorted(PRODUCERS), hits


def test_metric_names_are_defined_once_each(scanned):
    from trainer.metric import METRIC_NAMES, METRICS

    _, calls, _ = scanned
    assert METRIC_NAMES == tuple(METRICS) and len(METRIC_NAMES) >= 4
    for name in METRIC_NAMES:
        found = calls.get(name, [])
        assert len(found) == 1 and found[0].startswith("trainer/metric.py:"), (name, found)


def test_precision_choices_derive_from_the_tensorrt_precisions():
    from edgetune.device import PRECISION_CHOICES, PRECISIONS

    assert PRECISION_CHOICES == ("auto", *PRECISIONS)


def test_the_scan_sees_literal_copies():
    """The scanner itself: a tuple, a list, a set and dict keys are found; a starred or computed list is not."""
    src = 'A = ("x", "y")\nB = ["y", "x"]\nC = {"x", "y"}\nD = {"x": 1, "y": 2}\nE = ("x", *A)\nF = tuple(A)\n'
    found = [v for n in ast.walk(ast.parse(src)) for v in _literal(n)]
    assert found == [frozenset({"x", "y"})] * 4
