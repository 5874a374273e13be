"""The study's latency service (tuner/device.py): one async Ray actor on the driver's node that answers each
trial's "how fast is my architecture on the target?" from the cache, makes concurrent trials with the same new
architecture wait for one timing (claim tokens, released when a claimer cannot export), runs one timing at a time,
and stores every record in the study's storage."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from tuner.device import (  # noqa: F401 - SERVICE_NAME re-exported
    SERVICE_NAME,
    ArchSignature,
    LatencyCache,
    cache_target,
    target_resource,
    task_options,
    time_on_node,
)
from tuner.storage import rdb_storage

log = logging.getLogger(__name__)


class _Service:
    """The body of :class:`LatencyService` (an async Ray actor; see the module doc). Its Optuna storage calls are
    synchronous: each takes milliseconds and blocks the actor's event loop for that long, which is fine for a
    handful of trials per second."""

    def __init__(
        self,
        storage_url: str,
        target: str | None,
        protocol: dict[str, int],
        backend: str = "auto",
        timeout_s: float = 600.0,
    ) -> None:

        self.target = target
        self.cache_target = cache_target(target)
        self.protocol = dict(protocol)
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.cache = LatencyCache(rdb_storage(storage_url))
        self.memory: dict[str, dict[str, Any]] = {}
        self.inflight: dict[str, tuple[str, asyncio.Event]] = {}  #: signature key -> (claim token, done)
        self.one_at_a_time = asyncio.Semaphore(1)  #: no two timings of this study overlap (estimates included)
        self.stats = {"hits": 0, "timed": 0, "waited": 0, "unavailable": 0, "stale": 0}

    def _usable(self, rec: dict[str, Any] | None) -> dict[str, Any] | None:
        """A stored record counts only if it was timed with this study's protocol and backend (another
        ``--timing-runs`` or ``--timing-backend`` re-times and overwrites it)."""
        if rec is None:
            return None
        same = rec.get("protocol") == self.protocol and (
            self.backend == "auto" or str(rec.get("device", {}).get("backend")) == self.backend
        )
        if not same:
            self.stats["stale"] += 1
        return rec if same else None

    async def lookup(self, sig: dict[str, Any]) -> dict[str, Any]:
        """``{"status": "hit", "record": …}``, or ``{"status": "claim", "token": …}``: the caller exports and calls
        :meth:`measure` (or :meth:`release` if it cannot). A caller for an architecture being timed waits."""
        s = ArchSignature.from_dict(sig)
        while True:
            rec = self.memory.get(s.key) or self._usable(self.cache.get(self.cache_target, s))
            if rec is not None:
                self.memory[s.key] = rec
                self.stats["hits"] += 1
                return {"status": "hit", "record": rec}
            claim = self.inflight.get(s.key)
            if claim is None:
                token = uuid.uuid4().hex
                self.inflight[s.key] = (token, asyncio.Event())
                return {"status": "claim", "token": token}
            self.stats["waited"] += 1
            try:
                await asyncio.wait_for(claim[1].wait(), timeout=self.timeout_s + 60.0)
            except asyncio.TimeoutError:
                self._finish(s.key, claim[0])  # the claiming trial vanished without measuring or releasing
            # then: the record (hit), or the timing failed / its claimer gave up and this caller claims it

    def _finish(self, key: str, token: str) -> None:
        """End claim ``token`` on ``key`` (only that claim: a newer one is left alone) and wake its waiters."""
        claim = self.inflight.get(key)
        if claim is not None and claim[0] == token:
            del self.inflight[key]
            claim[1].set()

    def release(self, sig: dict[str, Any], token: str) -> None:
        """The claimer could not export its architecture: let the next caller claim it."""
        self._finish(ArchSignature.from_dict(sig).key, token)

    async def measure(self, sig: dict[str, Any], files: dict[str, bytes], token: str) -> dict[str, Any]:
        """Time the claimed architecture on the target; store and return the record, or the reason it failed."""
        import ray

        s = ArchSignature.from_dict(sig)
        try:
            async with self.one_at_a_time:
                t0 = time.time()
                ref = (
                    ray.remote(time_on_node)
                    .options(**task_options(self.target))
                    .remote(files, s.precision, self.protocol, self.backend)
                )
                try:
                    rec = await asyncio.wait_for(ref, timeout=self.timeout_s)
                except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                    ray.cancel(ref, force=True)
                    self.stats["unavailable"] += 1
                    where = target_resource(self.target) if self.target else "the driver node"
                    why = (
                        f"no timing (waiting for the node, engine build and runs) from {where} within "
                        f"{self.timeout_s:g} s: is the edge node up? (--timing-timeout)"
                        if isinstance(e, asyncio.TimeoutError)
                        else f"timing task failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    )
                    return {"status": "unavailable", "reason": why}
            rec["timing_wall_s"] = round(time.time() - t0, 3)
            rec["kind"] = "device" if self.target else "estimate"
            self.memory[s.key] = {**rec, "target": self.cache_target, "signature_key": s.key, "signature": s.to_dict()}
            self.stats["timed"] += 1
            try:
                self.cache.put(self.cache_target, s, rec)
            except Exception as e:  # noqa: BLE001 - the study goes on with the record in memory
                log.warning("latency record of %s not stored: %s", s.label, e)
            return {"status": "timed", "record": self.memory[s.key]}
        finally:
            self._finish(s.key, token)

    def get_stats(self) -> dict[str, int]:
        return dict(self.stats)


def start_service(
    study: str,
    storage_url: str,
    target: str | None,
    protocol: dict[str, int],
    backend: str = "auto",
    timeout_s: float = 600.0,
) -> Any:
    """The study's latency service: a named async actor pinned to the driver's node (where the storage is)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(_Service)
    return actor_cls.options(
        name=SERVICE_NAME.format(study=study),
        num_cpus=0,
        max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(storage_url, target, protocol, backend, timeout_s)
