"""Device in the loop: the target device is a Ray node; every candidate architecture is timed on it once.

``make edge-node HEAD=<host:port> TARGET=<name>`` joins a device to the cluster carrying the custom resource
``edge_target:<name>`` (amount 1, no CPUs or GPUs offered to training). ``make tune TARGET=<name>``:

1. :func:`require_target` finds the target's live nodes, or fails at once naming the resource and the command.
2. Each trial computes its architecture's :class:`ArchSignature` (backbone, head, input size, precision,
   batch size, classes). The study's latency service (:mod:`tuner.latency_service`, one Ray actor on the
   driver's node) answers from
   :class:`LatencyCache`, a record per (target, signature) in the study's own Optuna storage, so an architecture
   is timed once per target across trials and studies. On a miss the trial exports one ONNX bundle of the
   untrained architecture (latency depends on the architecture, not the weights) and the service runs one Ray
   task pinned to ``edge_target:<name>`` that builds and times it there with the server's runners
   (:func:`edge_server.agent.timing.time_bundle`: warm-up, fixed runs, p50/p90, device identity). Concurrent trials
   with the same new architecture wait for that one timing.
3. Without a target the same service times on the driver's node: recorded as an *estimate*, never as a
   device's latency.

A timing that cannot be had (the edge node died and did not return within ``timeout_s``; Ray retries the task
when a node with the resource returns) leaves the trial's ``target_latency_status`` saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from edge_server.agent.timing import device_identity, supported_precisions, time_bundle_files
from edgetune.device import RESOURCE_PREFIX, TARGET_RULE, valid_target
from edgetune.errors import ConfigError, EdgetuneError
from tuner.storage import rdb_storage

if TYPE_CHECKING:
    from trainer.config import TrainConfig  # annotations only: the edge's timing side never imports the trainer
    from tuner.space import SearchSpace


#: The Optuna study (in the study's storage) whose user attrs hold the latency records.
CACHE_STUDY = "edgetune-latency-cache"
#: The study's latency service actor (tuner/latency_service.py), named here so that trials find it without
#: importing the service module.
SERVICE_NAME = "edgetune-latency-{study}"
#: The measured p50 latency (ms) of a trial's architecture: its result key, its Optuna user attr, the second
#: objective of a multi-objective study and the leaderboard's column (spelled here only).
LATENCY_MS = "latency_ms"
log = logging.getLogger(__name__)


def cache_target(target: str | None) -> str:
    """The cache's target key: the target, or for estimates (no target: timed on the driver's node alongside
    training) ``estimate:<driver host>``, so that drivers on other machines sharing a storage do not mix."""
    return target or f"estimate:{platform.node()}"


def target_resource(target: str) -> str:
    """``edge_target:<target>``, the custom resource an edge node carries (validated name)."""
    if not valid_target(target):
        raise ConfigError(f"target must be {TARGET_RULE}, got {target!r}")
    return RESOURCE_PREFIX + target


def join_command(target: str) -> str:
    return f"make edge-node HEAD=<head host>:<port> TARGET={target}"


def live_targets() -> dict[str, list[str]]:
    """``{target: [node id, ...]}`` of the live nodes carrying an ``edge_target:*`` resource."""
    import ray

    out: dict[str, list[str]] = {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        for k, v in (n.get("Resources") or {}).items():
            if k.startswith(RESOURCE_PREFIX) and v > 0:
                out.setdefault(k[len(RESOURCE_PREFIX) :], []).append(n["NodeID"])
    return out


def require_target(target: str) -> list[str]:
    """Node ids of ``target``'s live nodes; raises naming the resource and the join command when there are none."""
    res = target_resource(target)
    found = live_targets()
    if found.get(target):
        return found[target]
    seen = f"; live targets: {sorted(found)}" if found else "; no live node carries any edge_target resource"
    raise EdgetuneError(
        f"target {target!r}: no live Ray node carries the resource {res}{seen}. Join the device to "
        f"this cluster first: `{join_command(target)}`"
    )


@dataclass(frozen=True)
class ArchSignature:
    """What a model's latency depends on (not its weights, dropout or training settings)."""

    backbone: str
    head: str
    head_hidden: tuple[int, ...]  #: () for a linear head
    input_size: tuple[int, int]
    num_classes: int
    precision: str = "fp32"
    batch: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_hidden"], d["input_size"] = list(self.head_hidden), list(self.input_size)
        return d

    @property
    def key(self) -> str:
        """Stable 16-hex key of the signature."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        head = self.head + ("-" + "x".join(map(str, self.head_hidden)) if self.head_hidden else "")
        return f"{self.backbone}/{head}/{self.input_size[0]}x{self.input_size[1]}/{self.precision}/b{self.batch}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSignature:
        return cls(
            backbone=d["backbone"],
            head=d["head"],
            head_hidden=tuple(d["head_hidden"]),
            input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
            num_classes=int(d["num_classes"]),
            precision=d.get("precision", "fp32"),
            batch=int(d.get("batch", 1)),
        )


def signature_for(
    train_config: TrainConfig, num_classes: int, precision: str = "fp32", batch: int = 1
) -> ArchSignature:
    """The signature of a :class:`trainer.config.TrainConfig`'s model."""
    from trainer.model import preprocess_spec_for  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torch, torchvision

    m = train_config.model
    spec = preprocess_spec_for(m)
    return ArchSignature(
        backbone=m.backbone,
        head=m.head,
        head_hidden=tuple(m.head_hidden) if m.head == "mlp" else (),
        input_size=(int(spec.input_size[0]), int(spec.input_size[1])),
        num_classes=int(num_classes),
        precision=precision,
        batch=int(batch),
    )


class LatencyCache:
    """Latency records keyed by (target, signature), kept as user attrs of the study :data:`CACHE_STUDY` in the
    given Optuna storage (public Optuna API: any RDB storage, shown in optuna-dashboard)."""

    def __init__(self, storage: Any) -> None:
        import optuna

        try:
            self._study = optuna.load_study(study_name=CACHE_STUDY, storage=storage)
        except KeyError:
            self._study = optuna.create_study(study_name=CACHE_STUDY, storage=storage, load_if_exists=True)

    @staticmethod
    def attr_key(target: str, sig: ArchSignature) -> str:
        return f"{target}|{sig.key}"

    def get(self, target: str, sig: ArchSignature) -> dict[str, Any] | None:
        rec = self._study.user_attrs.get(self.attr_key(target, sig))
        return dict(rec) if isinstance(rec, dict) and rec.get("p50_ms") else None

    def put(self, target: str, sig: ArchSignature, record: dict[str, Any]) -> None:
        self._study.set_user_attr(
            self.attr_key(target, sig),
            {**record, "target": target, "signature_key": sig.key, "signature": sig.to_dict()},
        )

    def records(self, target: str | None = None) -> list[dict[str, Any]]:
        out = []
        for k, v in self._study.user_attrs.items():
            if isinstance(v, dict) and "signature" in v and (target is None or k.split("|", 1)[0] == target):
                out.append(dict(v))
        return out


def time_on_node(
    files: dict[str, bytes], precision: str, protocol: dict[str, int], backend: str, keep_engine: bool = False
) -> dict[str, Any]:
    """The Ray task body: time the bundle on this node (imports only the core, numpy and the runtime);
    ``keep_engine``: keep a TensorRT engine in the device's engine cache (the winner's, for ``make engine``)."""
    import ray

    rec = time_bundle_files(files, precision=precision, protocol=protocol, backend=backend, keep_engine=keep_engine)
    rec["node_id"] = ray.get_runtime_context().get_node_id()
    return rec


def _capabilities(backend: str) -> dict[str, Any]:
    import ray

    return {
        "precisions": list(supported_precisions(backend)),
        "device": device_identity(backend),
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def search_precisions(supported: list[str], wanted: tuple[str, ...], target: str) -> list[str]:
    """The precisions that join the search: those the target supports, narrowed to ``--precisions`` if given."""
    if not wanted:
        return list(supported)
    missing = [p for p in wanted if p not in supported]
    if missing:
        raise ConfigError(
            f"--precisions {list(wanted)}: target {target!r} does not support {missing}; it supports {list(supported)}"
        )
    return [p for p in supported if p in wanted]


def task_options(target: str | None) -> dict[str, Any]:
    """Pinned to the target's resource (amount 1: timings on one device never overlap), or without a target to
    the driver's node. ``max_retries=-1``: a task lost with its node is retried when a node with the resource
    returns (the service's timeout bounds the wait)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if target:
        return {"num_cpus": 0, "resources": {target_resource(target): 1}, "max_retries": -1}
    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "max_retries": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def device_capabilities(target: str | None, backend: str = "auto", timeout_s: float = 120.0) -> dict[str, Any]:
    """Precisions the target supports and its identity (one short task on the target)."""
    import ray

    ref = ray.remote(_capabilities).options(**task_options(target)).remote(backend)
    try:
        caps: dict[str, Any] = ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise EdgetuneError(f"target {target!r}: no answer from its node within {timeout_s:g} s") from None
    return caps


@dataclass(frozen=True)
class LatencySetup:
    """What a trial needs to get its architecture's latency (bound into the TrialContext)."""

    study: str
    target: str | None  #: None: an estimate on the driver's node
    service: Any = None  #: the study's LatencyService actor handle (held by the driver for the study's life)
    max_latency_ms: float = 0.0  #: reject (PRUNED, before training) an architecture slower than this (p50)
    precision_param: str = "precision"  #: the search parameter holding the precision ("" = fp32)


def get_latency(setup: LatencySetup, train_config: TrainConfig, num_classes: int, precision: str) -> dict[str, Any]:
    """The trial's latency record from the service (timing its architecture first if nobody has)."""
    import ray

    sig = signature_for(train_config, num_classes, precision)
    service = setup.service
    if service is None:
        service = ray.get_actor(SERVICE_NAME.format(study=setup.study))
    answer: dict[str, Any] = dict(ray.get(service.lookup.remote(sig.to_dict())))
    if answer["status"] == "claim":
        # the timing side (edge_server.agent.timing, tuner.device) imports no trainer: tests/test_device_units.py
        from trainer.config import ModelConfig  # noqa: PLC0415 - lazy: trainer
        from trainer.export import bundle_files, write_architecture_bundle  # noqa: PLC0415 - lazy: torch
        from trainer.model import create_model, preprocess_spec_for  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torch, torchvision

        token = answer["token"]
        try:
            m = train_config.model
            cfg = ModelConfig(
                backbone=m.backbone, weights="none", head=m.head, head_hidden=m.head_hidden, img_size=m.img_size
            )
            model = create_model(cfg, num_classes)
            with tempfile.TemporaryDirectory(prefix="edgetune-arch-") as d:
                write_architecture_bundle(
                    model, preprocess_spec_for(cfg), num_classes, d, m.backbone, precision=sig.precision
                )
                files = bundle_files(d)
        except BaseException:
            ray.get(service.release.remote(sig.to_dict(), token))  # the next trial of this architecture claims it
            raise
        answer = dict(ray.get(service.measure.remote(sig.to_dict(), files, token)))
    answer["signature"] = sig
    return answer


def latency_metrics(answer: dict[str, Any], setup: LatencySetup) -> dict[str, Any]:
    """The result keys a trial reports (and the searcher copies to user attrs) for its latency."""
    sig: ArchSignature = answer["signature"]
    out: dict[str, Any] = {
        "latency_signature": sig.label,
        "latency_key": sig.key,
        "precision": sig.precision,
        "target_latency_status": answer["status"],
    }
    if answer["status"] == "unavailable":
        out["target_latency_status"] = f"unavailable: {answer['reason']}"
        return out
    rec = answer["record"]
    out[LATENCY_MS] = rec["p50_ms"]  # the second objective (multi-objective search)
    out["latency_p90_ms"] = rec["p90_ms"]
    out["latency_kind"] = rec.get("kind", "device")
    if setup.target:
        out.update(
            target_latency_ms=rec["p50_ms"],
            target_latency_p90_ms=rec["p90_ms"],
            target_node=rec["node_id"],
            target=setup.target,
            target_device=json.dumps(rec.get("device", {}), sort_keys=True),
        )
    else:
        out["latency_node"] = rec.get("node_id")
    return out


def rejection(metrics: dict[str, Any], max_latency_ms: float) -> str | None:
    """The reason an architecture is rejected by ``--max-latency-ms`` (None if it passes or is unknown)."""
    p50 = metrics.get(LATENCY_MS)
    if max_latency_ms > 0 and p50 is not None and p50 > max_latency_ms:
        return (
            f"latency constraint: {metrics['latency_signature']} p50 {p50:.2f} ms > --max-latency-ms "
            f"{max_latency_ms:g} ms; rejected before training"
        )
    return None


class LatencyRejector:
    """``config -> (reason, result keys)`` for a sampled configuration whose architecture the cache already knows
    to break ``--max-latency-ms``; None otherwise (an unknown one is timed in its trial, before its first epoch).
    Picklable (Ray checkpoints the searcher that holds it): the storage is opened lazily."""

    def __init__(
        self, base: TrainConfig, space: SearchSpace, num_classes: int, storage: str, setup: LatencySetup
    ) -> None:
        self.base, self.space, self.num_classes, self.storage = base, space, num_classes, storage
        self.setup = LatencySetup(
            study=setup.study,
            target=setup.target,
            max_latency_ms=setup.max_latency_ms,
            precision_param=setup.precision_param,
        )  # no actor handle in the searcher state
        self._cache: LatencyCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def __call__(self, config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        from trainer.config import TrainConfig  # noqa: PLC0415 - lazy: trainer (see get_latency)
        from tuner.space import build_trial_config, flatten_params  # noqa: PLC0415 - lazy: trainer (see get_latency)

        if not isinstance(self.base, TrainConfig):  # a searcher pickled by an earlier version held a dict
            self.base = TrainConfig.from_dict(self.base)
        flat = flatten_params(config)
        cfg = build_trial_config(self.base, self.space.to_overrides(flat))
        p = self.setup.precision_param
        sig = signature_for(cfg, self.num_classes, str(flat.get(p, "fp32")) if p else "fp32")
        if self._cache is None:
            self._cache = LatencyCache(rdb_storage(self.storage))
        rec = self._cache.get(cache_target(self.setup.target), sig)
        if rec is None:
            return None
        metrics = latency_metrics({"status": "hit", "record": rec, "signature": sig}, self.setup)
        reason = rejection(metrics, self.setup.max_latency_ms)
        return (reason, {**metrics, "rejected_at": "suggest"}) if reason else None
