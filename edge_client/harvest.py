"""``make harvest SERVER=host:port OUT=dir`` (``python -m edge_client.harvest``): pull the capture spool.

Lists the server's captured frames (ListCaptures, in id order), fetches each frame in chunks (FetchCapture) into
``OUT/.partial/`` — a broken connection or a killed harvest resumes where the partial file ends —, checks its
SHA-256, stores ``OUT/<id>.<ext>`` and ``OUT/<id>.json`` (fsync'ed), and only then acknowledges the stored
frames (AckCaptures), which deletes them on the device. A frame not stored is never acknowledged. Everything
the server sends is checked: a sidecar must be a valid capture record whose id, frame name and digest match the
listing, so a hostile server cannot make the harvest write outside ``OUT``.

TLS, mutual TLS and the camera token work as in the camera client; the admin token comes from
``--admin-token-file`` or ``EDGETUNE_ADMIN_TOKEN`` (never the command line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from edge_client.connection import ClientError, ConnectionOptions, describe_rpc_error, make_channel
from edgetune.backoff import Backoff
from edgetune.capture_record import SIDECAR_SUFFIX, CaptureRecord, CaptureRecordError
from edgetune.dataclass_cli import add_version
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.fsutil import atomic_write_text, commit_file
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("edge_client.harvest")
ADMIN_METADATA_KEY = "x-edgetune-admin-token"
CHUNK = 1 << 20
PARTIAL = ".partial"


@dataclass(frozen=True)
class HarvestResult:
    listed: int
    stored: int
    acknowledged: int
    bytes: int
    retries: int


class _Harvest:
    def __init__(self, conn: ConnectionOptions, admin_token: str, out: Path, ack: bool, timeout: float) -> None:
        self.conn, self.out, self.ack, self.timeout = conn, out, ack, timeout
        self.metadata = [*conn.metadata(), (ADMIN_METADATA_KEY, admin_token)]
        self.listed = self.stored = self.acknowledged = self.bytes = 0
        (out / PARTIAL).mkdir(parents=True, exist_ok=True)

    def page(self, stub: pb_grpc.ClassifierStub, after: str) -> tuple[str, bool]:
        """Store one listed page and acknowledge what was stored; (last id, more pages)."""
        res = stub.ListCaptures(
            pb.ListCapturesRequest(after=after, limit=100), timeout=self.timeout, metadata=self.metadata
        )
        acks = []
        for f in res.frames:
            self.listed += 1
            rec = _checked_record(f)
            if not self._stored(rec):
                self._fetch(stub, rec)
            acks.append(pb.CaptureAck(id=rec.id, frame_sha256=rec.frame_sha256))
            after = rec.id
        if acks and self.ack:
            got = stub.AckCaptures(pb.AckCapturesRequest(acks=acks), timeout=self.timeout, metadata=self.metadata)
            self.acknowledged += got.deleted
        return after, res.more

    def _stored(self, rec: CaptureRecord) -> bool:
        side = self.out / (rec.id + SIDECAR_SUFFIX)
        if not side.is_file():
            return False
        try:
            return (
                CaptureRecord.read(side).frame_sha256 == rec.frame_sha256
                and _sha256(self.out / rec.frame) == rec.frame_sha256
            )
        except (CaptureRecordError, OSError):
            return False

    def _fetch(self, stub: pb_grpc.ClassifierStub, rec: CaptureRecord) -> None:
        part = self.out / PARTIAL / (rec.frame + ".part")
        with open(part, "ab") as f:
            offset = f.tell()
            if offset > rec.frame_bytes:
                f.truncate(0)
                offset = 0
            while offset < rec.frame_bytes:
                chunk = stub.FetchCapture(
                    pb.FetchCaptureRequest(id=rec.id, offset=offset, length=CHUNK),
                    timeout=self.timeout,
                    metadata=self.metadata,
                )
                if chunk.offset != offset or not chunk.data and not chunk.eof:
                    raise ClientError(f"server sent a bad chunk of {rec.id} (offset {chunk.offset}, wanted {offset})")
                f.write(chunk.data)
                f.flush()
                offset += len(chunk.data)
                self.bytes += len(chunk.data)
                if chunk.eof:
                    break
            os.fsync(f.fileno())
        if _sha256(part) != rec.frame_sha256:
            part.unlink()
            raise ClientError(f"captured frame {rec.id}: SHA-256 mismatch after transfer; it will be fetched again")
        commit_file(part, self.out / rec.frame)
        # the sidecar last: a frame counts as harvested once its sidecar is there
        atomic_write_text(self.out / (rec.id + SIDECAR_SUFFIX), rec.to_json())
        self.stored += 1


def _checked_record(f: pb.CapturedFrame) -> CaptureRecord:
    try:
        rec = CaptureRecord.from_dict(json.loads(f.sidecar_json), f"sidecar of {f.id[:40]!r}")
    except (ValueError, CaptureRecordError) as e:
        raise ClientError(f"the server sent an invalid capture record: {e}") from None
    if (rec.id, rec.frame, rec.frame_sha256, rec.frame_bytes) != (f.id, f.frame_name, f.frame_sha256, f.frame_bytes):
        raise ClientError(f"the server's listing of {f.id[:40]!r} does not match its sidecar")
    return rec


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def harvest(
    conn: ConnectionOptions,
    admin_token: str,
    out: str | Path,
    ack: bool = True,
    timeout: float = 30.0,
    max_retry_time: float = 60.0,
) -> HarvestResult:
    """Pull the whole spool into ``out``; retries retryable failures for up to ``max_retry_time`` s per outage."""
    h = _Harvest(conn, admin_token, Path(out), ack, timeout)
    backoff = Backoff(initial=0.2, maximum=5.0, max_total=max_retry_time)
    retries = 0
    after, more = "", True
    while more:
        channel = make_channel(conn, connect_timeout=min(timeout, 10.0))
        try:
            stub = pb_grpc.ClassifierStub(channel)
            while more:
                after, more = h.page(stub, after)
                backoff.reset()
        except grpc.RpcError as e:
            retryable, msg = describe_rpc_error(e, conn, established=h.listed > 0)
            delay = backoff.next_delay() if retryable else None
            if delay is None:
                raise ClientError(msg) from None
            retries += 1
            log.warning("harvest: %s; retrying in %.1f s", msg, delay)
            time.sleep(delay)
        finally:
            channel.close()
    return HarvestResult(listed=h.listed, stored=h.stored, acknowledged=h.acknowledged, bytes=h.bytes, retries=retries)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edge_client.harvest",
        description="pull an edge server's capture spool (make harvest SERVER=host:port OUT=dir)",
    )
    add_version(p)
    p.add_argument("--server", required=True, help="host:port of the edge server")
    p.add_argument("--out", required=True, help="folder the frames and sidecars go to (created)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system root CAs")
    p.add_argument("--tls-ca", help="PEM CA of the server certificate (enables TLS)")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    p.add_argument("--tls-server-name", help="name expected in the server certificate (default: the host)")
    p.add_argument("--token-file", help="camera token file (default: $EDGETUNE_TOKEN), if the server has one")
    p.add_argument("--admin-token-file", help="admin token file (default: $EDGETUNE_ADMIN_TOKEN)")
    p.add_argument("--no-ack", action="store_true", help="copy only; leave every frame on the device")
    p.add_argument("--max-retry-time", type=float, default=60.0, help="seconds to keep retrying a lost connection")
    return p


def _read_secret(path: str | None, env: str, what: str) -> str | None:
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"cannot read the {what} file {path}: {e.strerror}") from None
        if not text:
            raise ConfigError(f"the {what} file {path} is empty")
        return text
    return os.environ.get(env) or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="edgetune: %(message)s")
    try:
        admin = _read_secret(args.admin_token_file, "EDGETUNE_ADMIN_TOKEN", "admin token")
        if not admin:
            raise ConfigError("harvest needs the admin token: --admin-token-file FILE or EDGETUNE_ADMIN_TOKEN")
        conn = ConnectionOptions(
            server=args.server,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            tls=args.tls,
            token=_read_secret(args.token_file, "EDGETUNE_TOKEN", "camera token"),
        )
        r = harvest(conn, admin, args.out, ack=not args.no_ack, max_retry_time=args.max_retry_time)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, ClientError) else 2
    print(json.dumps({"out": str(Path(args.out).resolve()), **r.__dict__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
