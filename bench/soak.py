"""Soak and fuzz of the edge server under hostile load (issue 11).

``make soak`` runs it for 120 s (``SOAK_ARGS="--duration 600"`` for longer); ``tests/test_soak.py`` runs a
20 s version inside ``make test``. One real server (``python -m edge_server``, camera token, LoadModel
enabled with an admin token and a model root) on 127.0.0.1, and at once, each in its own thread:

* valid unary Classify calls (their latency under attack is the p99 reported);
* hostile unary calls: the 1x60000 PNG, header bombs of every accepted format, other formats, garbage,
  truncations, absurd top_k;
* Hypothesis-generated images (random sizes, channels, depths, formats, byte flips, truncations) and
  Hypothesis-generated protobuf bytes sent raw to every method, with and without the token;
* idle streams beyond ``--max-streams`` (refused, or closed by the idle timeout), a fast stream (latest
  frame wins), hostile streams (1 MiB camera ids, bad frames);
* LoadModel swaps between two valid bundles and attempts with broken ones (labels/outputs mismatch,
  tampered model, manifest escaping the bundle, paths outside the model root, no or a wrong admin token);
* health checks every 100 ms, GetStats every 500 ms;
* the real camera client (``edge_client.client.CameraStream``, a video file at 10 fps) attached throughout,
  while the server is killed with SIGKILL half-way and restarted on the same port.

It asserts: the server's peak RSS stays under ``--rss-limit-mb``; health is SERVING throughout except during
the planned restart; every frame the client sent is accounted for (answered, dropped by latest-frame-wins
or reported lost); no call ever ends with UNKNOWN; every error the server replied is in its log (per status
code, logged >= observed); the broken LoadModel attempts are refused and the valid ones succeed. It prints
requests served, hostile inputs tried, peak RSS, p99 latency of valid requests under attack and frames lost,
and writes them as JSON (``--json``). Exit status 0 = every check passed.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpc  # noqa: E402
from soak_checks import logged_errors, report  # noqa: E402
from soak_inputs import good_images, hostile_payloads  # noqa: E402
from soak_state import ADMIN_TOKEN, CAM_MD, CAMERA_TOKEN  # noqa: E402
from soak_workers import SoakWorkers  # noqa: E402

from edge_client.client import CameraStream  # noqa: E402
from edge_client.connection import ConnectionOptions  # noqa: E402
from edge_client.sources import VideoFileSource  # noqa: E402
from edge_client.stream_options import StreamOptions  # noqa: E402
from edgetune.v1 import classifier_pb2 as pb  # noqa: E402
from edgetune.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402


class Soak(SoakWorkers):
    """One soak: the server and its inputs (``prepare``, ``start_server``), the workers and the camera client
    through the planned kill -9 (``run``); the checks are ``soak_checks.report``."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        super().__init__(args, work, good_images())

    # -- server ---------------------------------------------------------------------------------
    def start_server(self, port: int = 0, log_name: str | None = None) -> Any:
        from testkit.edge_fixtures import CliServer

        n = len(self.servers) + 1
        srv = CliServer(
            [
                "--bundle",
                str(self.models / "a"),
                "--port",
                str(port),
                "--threads",
                "1",
                "--max-streams",
                "8",
                "--max-concurrent",
                "16",
                "--stream-idle-timeout",
                "2",
                "--max-pixels",
                str(4 * 1024 * 1024),
                "--max-decode-mb",
                "128",
                "--max-inflight-mb",
                "128",
                "--grace",
                "2",
                "--token-file",
                str(self.work / "camera.token"),
                "--enable-load-model",
                "--model-root",
                str(self.models),
                "--admin-token-file",
                str(self.work / "admin.token"),
            ],
            self.work / (log_name or f"server-{n}.log"),
        )
        with self._server_lock:
            self.servers.append(srv)
        self.address = srv.address
        return srv

    def prepare(self) -> None:
        from testkit.edge_fixtures import cached_test_bundle, copy_bundle

        a = Path(self.args.bundle) if self.args.bundle else cached_test_bundle(seed=0)
        b = Path(self.args.bundle_b) if self.args.bundle_b else cached_test_bundle(seed=1)
        self.models = self.work / "models"
        copy_bundle(a, self.models / "a")
        copy_bundle(b, self.models / "b")
        bad = copy_bundle(a, self.models / "broken-labels")
        meta = json.loads((bad / "bundle.json").read_text())
        meta["labels"] = meta["labels"][:2]
        (bad / "bundle.json").write_text(json.dumps(meta))
        tampered = copy_bundle(a, self.models / "tampered")
        data = bytearray((tampered / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tampered / "model.onnx").write_bytes(bytes(data))
        escape = copy_bundle(a, self.models / "escape")
        meta = json.loads((escape / "bundle.json").read_text())
        meta["model_file"] = "../../../../../../etc/passwd"
        (escape / "bundle.json").write_text(json.dumps(meta))
        for name, token in (("camera.token", CAMERA_TOKEN), ("admin.token", ADMIN_TOKEN)):
            (self.work / name).write_text(token + "\n")
            (self.work / name).chmod(0o600)
        from testkit.client_media import write_video

        n = max(30, int(self.args.client_fps * (self.args.duration - 8)))  # ends before the soak does
        self.video = write_video(self.work / "camera.avi", n=n, size=96)
        self.video_frames = n

    # -- states the run waits for (each with a generous deadline: the checks then report what is missing) --------
    def _wait_for_kill_point(self, cs: Any, records: list[dict], box: dict[str, Any]) -> None:
        """Half-way, or earlier once the client has sent half its video: it has then had an answer and at least
        half its frames are still to come (paced at --client-fps), so the kill finds it streaming."""
        half_time = self.t0 + self.args.duration * 0.5
        deadline = time.monotonic() + max(300.0, self.args.duration * 2)
        while time.monotonic() < deadline and not box:
            if records and (time.monotonic() >= half_time or cs.stats.sent >= self.video_frames // 2):
                return
            time.sleep(0.05)

    def _wait_quiet_and_logged(self, timeout: float = 120.0) -> None:
        """Until no hostile call is in flight (they are paused) and the server's log holds every error it replied
        so far (refusals are logged aggregated, at most one line per second and key)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.busy_lock:
                busy = self.hostile_busy
            if not busy:
                with self.tally.lock:
                    observed = collections.Counter(code for _ts, code in self.tally.server_errors)
                    frames = len(self.tally.frame_errors)
                logged, logged_frames = logged_errors(self)
                if logged_frames >= frames and all(logged[c] >= n for c, n in observed.items()):
                    return
            time.sleep(0.2)

    def _wait_recovered(self, t_kill: float, cs: Any, client: threading.Thread) -> None:
        """After the restart: until health is SERVING again, a valid Classify was answered and the camera client
        reconnected (or ended), so a soak whose restart took most of --duration still checks the recovery."""
        deadline = time.monotonic() + self.args.restart_limit_s + 30.0
        while time.monotonic() < deadline:
            with self.tally.lock:
                serving = any(t0 > t_kill and st == "SERVING" for t0, _t1, st in self.tally.health)
                answered = any(t0 > t_kill for t0, _ms in self.tally.valid_ms)
            if serving and answered and (cs.stats.reconnects >= 1 or not client.is_alive()):
                return
            time.sleep(0.1)

    def _wait_volume(self, t_start: float) -> None:
        """Past --duration, until the load reached --min-hostile hostile inputs and --min-served answered calls
        (a loaded machine sends fewer in the same seconds), at most until max(300, 2 x --duration) s."""
        deadline = t_start + max(300.0, 2 * self.args.duration)
        while time.monotonic() < deadline:
            with self.tally.lock:
                if self.tally.hostile >= self.args.min_hostile and self.tally.served >= self.args.min_served:
                    return
            time.sleep(0.2)

    def _kill_and_restart(self, srv: Any, port: int) -> tuple[float, Any]:
        """The planned kill -9 once the hostile workers are paused and logged; a new server on the same port.
        Returns the time of the kill and the new server (serving when this returns)."""
        self.pause.set()
        self._wait_quiet_and_logged()
        t_kill = time.monotonic()
        self.window = (t_kill, t_kill + 120.0)
        srv.kill()
        second = self.start_server(port)
        self.window = (t_kill, t_kill + 120.0)  # until the first SERVING health check after the kill (soak_checks)
        self.pause.clear()
        return t_kill, second

    # -- the run --------------------------------------------------------------------------------
    def _worker_threads(self) -> list[threading.Thread]:
        """The load's threads (not started): every worker, or those ``--workers`` names, and the RSS sampler."""
        workers = [
            (self.valid_unary, 0.05, False),
            (self.hostile_unary, 0.05, True),
            (self.fuzz, 0.0, True),
            (self.idle_flood, 0.5, True),
            (self.fast_stream, 0.5, False),
            (self.hostile_stream, 0.5, True),
            (self.load_model, 1.5, True),
            (self.health, 0.1, False),
            (self.get_stats, 0.5, False),
        ]
        if self.args.workers:
            keep = set(self.args.workers.split(","))
            workers = [w for w in workers if w[0].__name__ in keep or w[0].__name__ in ("health", "valid_unary")]
        threads = [
            threading.Thread(target=self._loop, args=w, name=f"soak-{w[0].__name__}", daemon=True) for w in workers
        ]
        threads.append(threading.Thread(target=self.sample_rss, name="soak-rss", daemon=True))
        return threads

    def _camera_client(self, port: int) -> tuple[Any, list[dict], dict[str, Any], threading.Thread]:
        """The real camera client on the server's port (not started): the stream, its records, the box its
        result or error lands in, and its thread."""
        client_records: list[dict] = []
        cs = CameraStream(
            VideoFileSource(self.video, "soak-cam"),
            ConnectionOptions(f"127.0.0.1:{port}", token=CAMERA_TOKEN),
            StreamOptions(fps=self.args.client_fps, max_retry_time=60.0, backoff_initial=0.1, backoff_max=1.0),
            [lambda rec, _img: client_records.append(rec)],
        )
        box: dict[str, Any] = {}

        def run_client() -> None:
            try:
                box["stats"] = cs.run()
            except BaseException as e:  # reported below
                box["error"] = e

        client = threading.Thread(target=run_client, name="soak-client", daemon=True)
        return cs, client_records, box, client

    def run(self) -> dict[str, Any]:
        args = self.args
        t_prep = time.monotonic()
        self.prepare()
        self.good_payloads = hostile_payloads(self.good[0])
        srv = self.start_server()
        self.phases = {"prepare_s": round(time.monotonic() - t_prep, 1)}
        port = srv.port
        self.rss_at_start_mb = srv.hwm_mb()
        t_start = self.t0 = time.monotonic()
        threads = self._worker_threads()
        cs, client_records, box, client = self._camera_client(port)
        for t in [*threads, client]:
            t.start()
        # planned kill -9 half-way, restart on the same port; arranged on states, not on sleeps (a loaded machine
        # is slow): the camera client is mid-video, no hostile call is in flight, the server has logged them all
        self._wait_for_kill_point(cs, client_records, box)
        t_kill, second = self._kill_and_restart(srv, port)
        restart_s = time.monotonic() - t_kill
        self.stop.wait(max(0.0, t_start + args.duration - time.monotonic()))
        self._wait_recovered(t_kill, cs, client)
        self._wait_volume(t_start)
        self.stop.set()
        t_join = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        client.join(timeout=300)  # the rest of its video, however slow the machine
        self.phases["join_s"] = round(time.monotonic() - t_join, 1)
        with grpc.insecure_channel(second.address) as ch:
            final = pb_grpc.ClassifierStub(ch).GetStats(pb.GetStatsRequest(), timeout=10, metadata=CAM_MD)
        second.stop()
        wall = time.monotonic() - t_start
        return self.run_attacks(report(self, box, client_records, final, restart_s, wall, client.is_alive()))

    def run_attacks(self, res: dict[str, Any]) -> dict[str, Any]:
        """The targeted attacks (``bench/soak_attacks.py``), each on a fresh server, one line each; their results
        and failures added to ``res``."""
        from soak_attacks import ATTACKS, Attacks

        names = (
            ATTACKS if self.args.attacks == "all" else [a for a in self.args.attacks.split(",") if a and a != "none"]
        )
        unknown = sorted(set(names) - set(ATTACKS))
        if unknown:
            raise SystemExit(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
        from edge_server.budget import request_memory_bound_mb

        # the soak server's limits (start_server): 16 MB messages, 16 unary calls, 8 streams, 128 + 128 MB budgets
        bound = request_memory_bound_mb(16.0, 16, 8, 128.0, 128.0)
        attacks = Attacks(
            lambda log_name: self.start_server(log_name=log_name),
            self.good[0],
            max_streams=8,
            idle_s=2.0,
            grace_s=2.0,
            rss_budget_mb=self.args.rss_limit_mb,
            request_bound_mb=bound,
        )
        for name in names:
            print(Attacks.line(attacks.run(name)), flush=True)
        res["attacks"] = attacks.results
        for a in attacks.results.values():
            res["failures"] += [f"attack {a['attack']}: {f}" for f in a["failures"]]
        return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (the kill -9 is half-way)")
    p.add_argument("--bundle", help="bundle A (default: a small trained test bundle, built once)")
    p.add_argument("--bundle-b", help="bundle B for the LoadModel swaps (default: another test bundle)")
    p.add_argument("--rss-limit-mb", type=int, default=512, help="the server's peak RSS must stay below this")
    p.add_argument("--client-fps", type=float, default=10.0, help="frame rate of the attached camera client")
    p.add_argument(
        "--restart-limit-s",
        type=float,
        default=60.0,
        help="health must be SERVING and a valid Classify answered within this of the kill -9 (a figure "
        "for a loaded machine; the measured time is reported)",
    )
    p.add_argument(
        "--min-hostile", type=int, default=0, help="go on past --duration until this many hostile inputs were tried"
    )
    p.add_argument(
        "--min-served", type=int, default=0, help="go on past --duration until the server answered this many calls"
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    p.add_argument(
        "--attacks",
        default="all",
        help="targeted attacks after the mixed load: all (default), none, or a comma list of "
        "health-stall,stream-window0,big-messages,nonutf8-metadata,log-flood,webp-chunks,sighup,getstats",
    )
    p.add_argument("--workers", help=argparse.SUPPRESS)  # debugging: a comma list of worker names to run
    return p


def print_summary(res: dict[str, Any]) -> None:
    """The soak's figures on stdout, ending with the one-line ``SOAK {...}`` summary."""
    print(
        f"soak: {res['duration_s']:g} s of hostile load on 127.0.0.1 ({res['cpus']} CPUs, load average "
        f"{res['load_average_end']}), kill -9 + restart half-way ({res['restart_s']} s to serve again, health "
        f"SERVING again {res['health_back_after_kill_s']} s after the kill)"
    )
    print(f"  requests served       {res['requests_served']}")
    print(f"  hostile inputs tried  {res['hostile_inputs']}")
    print(
        f"  peak RSS (server)     {res['peak_rss_mb']} MB (limit {res['rss_limit_mb']} MB; "
        f"{res['rss_at_start_mb']} MB after start)"
    )
    print(
        f"  p99 latency of valid requests under attack  {res['valid_p99_ms']} ms "
        f"(p50 {res['valid_p50_ms']} ms, {res['valid_requests']} requests)"
    )
    print(f"  frames lost           {res['frames_lost']} (camera client: {res['client']})")
    print(
        f"  health not SERVING outside the restart: {res['health_not_serving_outside_restart']} of "
        f"{res['health_checks']}; UNKNOWN statuses: {res['unknown']}; LoadModel as expected: "
        f"{res['loadmodel_as_expected']}"
    )
    print(
        f"  errors replied by the server {res['errors_observed']} + {res['frame_errors_observed']} frame errors; "
        f"logged {res['errors_logged']} + {res['frame_errors_logged']} frame errors"
    )
    print(
        "SOAK "
        + json.dumps(
            {
                k: res[k]
                for k in ("requests_served", "hostile_inputs", "peak_rss_mb", "valid_p99_ms", "frames_lost", "failures")
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    import cv2.utils.logging as cv_log

    cv_log.setLogLevel(cv_log.LOG_LEVEL_SILENT)  # the fuzzer's own encoder attempts with odd modes are not news
    p = build_parser()
    args = p.parse_args(argv)
    if args.duration < 10:
        p.error("--duration must be at least 10 s")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="edgetune-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, work)
    try:
        res = soak.run()
    finally:
        for srv in soak.servers:
            srv.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    for f in res["failures"]:
        print(f"FAIL: {f}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
