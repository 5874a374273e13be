"""The soak's checks (``bench/soak.py``): after the run, every invariant judged against what the workers,
the camera client and the servers' logs recorded, outside the planned restart; the figures of the report."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from soak_state import SoakState


@dataclass(frozen=True)
class ErrorCounts:
    """Errors the server replied outside the restart window (per status code, and frame errors) vs those it logged."""

    observed: collections.Counter
    logged: collections.Counter
    observed_frames: int
    logged_frames: int

    def figures(self) -> dict[str, Any]:
        return {
            "errors_observed": dict(self.observed),
            "errors_logged": dict(self.logged),
            "frame_errors_observed": self.observed_frames,
            "frame_errors_logged": self.logged_frames,
        }


def server_state_checks(soak: SoakState, fails: list[str]) -> list[tuple[float, str]]:
    """UNKNOWN statuses, the RSS limit and health outside the restart; returns the health checks not SERVING."""
    t = soak.tally
    if t.unknown:
        fails.append(f"{len(t.unknown)} call(s) ended with UNKNOWN: {t.unknown[:3]}")
    if soak.peak_rss_mb >= soak.args.rss_limit_mb:
        fails.append(f"server peak RSS {soak.peak_rss_mb} MB >= limit {soak.args.rss_limit_mb} MB")
    bad_health = [
        (round(t0 - soak.t0, 2), s) for t0, t1, s in t.health if s != "SERVING" and not soak.overlaps_window(t0, t1)
    ]
    if bad_health:
        fails.append(f"health not SERVING outside the restart: {bad_health[:5]} ({len(bad_health)})")
    return bad_health


def error_counts(soak: SoakState, fails: list[str]) -> ErrorCounts:
    """Every error replied outside the restart window must be in the server's log."""
    t = soak.tally
    logged, logged_frames = logged_errors(soak)
    observed = collections.Counter(code for ts, code in t.server_errors if not soak.in_window(ts))
    observed_frames = sum(1 for ts in t.frame_errors if not soak.in_window(ts))
    unlogged = {c: (n, logged[c]) for c, n in observed.items() if logged[c] < n}
    if unlogged:
        fails.append(f"errors replied but not logged (observed, logged): {unlogged}")
    if logged_frames < observed_frames:
        fails.append(f"frame errors: {observed_frames} replied, {logged_frames} logged")
    return ErrorCounts(observed, logged, observed_frames, logged_frames)


def timing_figures(soak: SoakState, wall: float) -> dict[str, Any]:
    """How long the soak ran, the restart window, each phase's seconds and the load average at the end."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "duration_s": soak.args.duration,
        "wall_s": round(wall, 1),
        "cpus": os.cpu_count(),
        "restart_window_s": [round(v - soak.t0, 2) for v in soak.window] if soak.window else None,
        "health_back_after_kill_s": round(soak.window[1] - soak.window[0], 2) if soak.window else None,
        **soak.phases,
        "load_average_end": [round(v, 2) for v in load],
    }


def volume_figures(soak: SoakState, lat: list[float]) -> dict[str, Any]:
    """Requests served, hostile inputs, memory, and the latency of valid requests outside the restart."""
    t = soak.tally
    p99 = float(np.percentile(lat, 99)) if lat else None
    return {
        "requests_served": t.served,
        "hostile_inputs": t.hostile,
        "peak_rss_mb": soak.peak_rss_mb,
        "rss_limit_mb": soak.args.rss_limit_mb,
        "rss_at_start_mb": soak.rss_at_start_mb,
        "valid_p99_ms": round(p99, 1) if p99 is not None else None,
        "valid_p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None,
        "valid_requests": len(lat),
    }


def report(
    soak: SoakState,
    box: dict[str, Any],
    records: list[dict],
    final: Any,
    restart_s: float,
    wall: float,
    client_hung: bool,
) -> dict[str, Any]:
    t = soak.tally
    fails = list(t.failures) + restart_failures(soak)
    bad_health = server_state_checks(soak, fails)
    csum = client_checks(soak, box, records, client_hung, fails)
    errors = error_counts(soak, fails)
    if t.stats_bytes_max > 100_000:
        fails.append(f"GetStats grew to {t.stats_bytes_max} bytes")
    lm_ok = sum(1 for _, want, got in soak.loadmodel_results if want == got)
    lm_other = [r for r in soak.loadmodel_results if r[1] != r[2]]
    lat = [ms for ts, ms in t.valid_ms if not soak.in_window(ts)]
    if not lat:
        fails.append("no valid request was answered")
    return {
        **timing_figures(soak, wall),
        **volume_figures(soak, lat),
        "frames_lost": csum.get("lost"),
        "client": csum,
        "restart_s": round(restart_s, 2),
        "health_checks": len(t.health),
        "health_not_serving_outside_restart": len(bad_health),
        "unknown": len(t.unknown),
        **errors.figures(),
        "final_errors_total": final.errors_total,
        "stats_bytes_max": t.stats_bytes_max,
        "loadmodel_as_expected": f"{lm_ok}/{len(soak.loadmodel_results)}",
        "fast_streams": soak.fast_streams,
        "loadmodel_other": lm_other,
        "codes": {f"{w}:{c}": n for (w, c), n in sorted(t.codes.items())},
        "failures": fails,
    }


def restart_failures(soak: SoakState) -> list[str]:
    """Sets ``soak.window`` to the planned restart as observed; the failures around it: the server not back in
    ``--restart-limit-s``, and every timed failure (valid Classify, LoadModel) outside the restart.

    The restart lasts from the kill until this process's channels reach the new server again: the first SERVING
    health check after the kill (they reconnect within 0.5 s: see SoakWorkers._channel_options). A call counts as
    part of it when it was in flight at any moment of it (one in flight at the kill is cut by the kill). The valid
    Classify worker's own channel may still be backing off when health is SERVING, so for it the restart ends at
    its own first answer after the kill; every failure after that is a failure."""
    t = soak.tally
    t_kill = soak.window[0] if soak.window else 0.0
    back = [t0 for t0, _t1, st in t.health if t0 > t_kill and st == "SERVING"]
    soak.window = (t_kill, back[0] if back else float("inf"))
    valid_back = [t0 for t0, _ms in t.valid_ms if t0 > t_kill]
    valid_end = max(soak.window[1], valid_back[0] if valid_back else float("inf"))
    fails = []
    limit = soak.args.restart_limit_s
    if not back or back[0] - t_kill > limit:
        fails.append(
            f"health not SERVING again within {limit:g} s of the kill -9 (back after "
            f"{(back[0] - t_kill) if back else float('inf'):.1f} s)"
        )
    if not valid_back or valid_back[0] - t_kill > limit:
        fails.append(f"no valid Classify answered within {limit:g} s of the kill -9")
    fails += [
        msg
        for worker, t0, t1, msg in soak.timed_failures
        if not soak.overlaps_window(t0, t1, valid_end if worker == "valid" else None)
    ][:20]
    return fails


def client_checks(
    soak: SoakState, box: dict[str, Any], records: list[dict], client_hung: bool, fails: list[str]
) -> dict[str, Any]:
    """The client: every frame accounted for (failures appended to ``fails``); its summary."""
    cstats = box.get("stats")
    if client_hung or "error" in box or cstats is None:
        fails.append(f"camera client failed: {box.get('error')!r} (hung: {client_hung})")
        return {}
    csum = cstats.summary()
    ids = sorted(r["frame_id"] for r in records)
    if cstats.sent != cstats.results + cstats.dropped + cstats.lost:
        fails.append(f"client frames unaccounted: {csum}")
    if cstats.sent != soak.video_frames or len(set(ids)) + cstats.dropped + cstats.lost != cstats.sent:
        fails.append(f"client sent {cstats.sent} of {soak.video_frames} frames; answered {len(set(ids))}")
    if cstats.reconnects < 1:
        fails.append("the camera client did not reconnect after the kill -9")
    return csum


def logged_errors(soak: SoakState) -> tuple[collections.Counter, int]:
    """What the servers logged: errors replied, by code, and frame errors (every one replied must be here)."""
    logged: collections.Counter = collections.Counter()
    logged_frames = 0
    for srv in soak.servers:
        for rec in srv.records():
            msg, code = rec.get("msg", ""), rec.get("code")
            n = int(rec.get("count", 1))  # grouped lines stand for `count` events
            if msg in ("rpc error", "rpc rejected") and code:
                logged[code] += n
            elif msg == "unexpected error in handler; answered INTERNAL":
                logged["INTERNAL"] += n
            elif rec.get("logger", "").startswith("grpc") and "deserializ" in msg.lower():
                logged["INTERNAL"] += n
            elif msg in ("frame refused", "frame error", "unexpected error processing a frame; the stream goes on"):
                logged_frames += n
    return logged, logged_frames
