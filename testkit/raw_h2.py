"""A raw HTTP/2 gRPC client (the ``h2`` package) for attacks a grpcio client cannot make: calls that send their
headers but never their request message, and streams on a connection whose receive window is 0 (the client
answers pings and settings, never reads a byte of data). Used by the server tests and ``bench/soak.py``."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def gzip_frame(message: bytes) -> bytes:
    """One gzip-compressed gRPC message (send it with metadata ``grpc-encoding: gzip``)."""
    import gzip

    body = gzip.compress(message, compresslevel=9)
    return b"\x01" + struct.pack(">I", len(body)) + body


class RawH2:
    """One HTTP/2 connection to ``address`` (``host:port``). ``window`` is the initial stream receive window it
    announces (0: the server cannot send a byte of DATA on any stream); ``read=False`` never widens it."""

    def __init__(self, address: str, window: int = 65535, read: bool = True, timeout: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.address = address
        self.read = read
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.settimeout(None)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._lock = threading.Lock()
        self.ended: dict[int, str] = {}  # stream -> "grpc-status N" | "reset N" | "closed"
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.data: dict[int, int] = {}  # stream -> DATA bytes received
        self.closed = threading.Event()
        self.headers_sent: list[int] = []  # for callers that keep count of the calls they opened
        with self._lock:
            self.conn.initiate_connection()
            self._flush()
        self._reader = threading.Thread(target=self._read_loop, name="raw-h2-reader", daemon=True)
        self._reader.start()

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def _read_loop(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    for ev in self.conn.receive_data(chunk):
                        self._event(ev)
                    self._flush()  # ping and settings acknowledgements (h2 makes them), window updates
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()

    def _event(self, ev: Any) -> None:
        sid = getattr(ev, "stream_id", 0)
        if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            hdrs = dict(ev.headers)
            self.headers.setdefault(sid, {}).update(hdrs)
            if b"grpc-status" in hdrs:
                self.ended[sid] = f"grpc-status {hdrs[b'grpc-status'].decode()}"
        elif isinstance(ev, h2.events.DataReceived):
            self.data[sid] = self.data.get(sid, 0) + len(ev.data)
            if self.read:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.StreamReset):
            self.ended.setdefault(sid, f"reset {int(ev.error_code)}")
        elif isinstance(ev, h2.events.StreamEnded):
            self.ended.setdefault(sid, "closed")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed.set()

    def open(
        self,
        path: str,
        metadata: tuple[tuple[str, str | bytes], ...] = (),
        message: bytes | None = None,
        end: bool = False,
        raw_message: bytes | None = None,
    ) -> int:
        """Start a call on ``path``: headers, then ``message`` (if given) as one gRPC frame, or ``raw_message``
        as it is (an already framed, e.g. compressed, message); ``end`` half-closes."""
        if message is not None:
            raw_message = grpc_frame(message)
        deadline = time.monotonic() + 30
        while True:  # the server's SETTINGS_MAX_CONCURRENT_STREAMS: wait for one of ours to end
            with self._lock:
                if self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams:
                    break
            if time.monotonic() > deadline or self.closed.is_set():
                raise TimeoutError("no HTTP/2 stream free on this connection within 30 s")
            time.sleep(0.01)
        with self._lock:
            sid = self.conn.get_next_available_stream_id()
            hdrs: list[tuple[bytes, bytes]] = [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", self.address.encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ]
            hdrs += [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in metadata]
            self.conn.send_headers(sid, hdrs, end_stream=end and raw_message is None)
            self._flush()
        if raw_message is not None:
            self.send_raw(sid, raw_message, end)
        return sid

    def send(self, sid: int, message: bytes, end: bool = False, timeout: float = 30.0) -> None:
        """One gRPC message on stream ``sid``, in frames the server's flow-control windows allow."""
        self.send_raw(sid, grpc_frame(message), end, timeout)

    def send_raw(self, sid: int, framed: bytes, end: bool = False, timeout: float = 30.0) -> None:
        """Bytes on stream ``sid`` as they are (``b""`` with ``end``: half-close), as the windows allow."""
        data = memoryview(framed)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                stream = self.conn.streams.get(sid)
                if stream is None or stream.closed:
                    return  # the server reset the call
                if sid in self.ended:  # the server answered already: close our side too (frees the stream)
                    self.conn.reset_stream(sid)
                    self._flush()
                    return
                n = min(len(data), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if n or not data:
                    self.conn.send_data(sid, bytes(data[:n]), end_stream=end and n == len(data))
                    self._flush()
                    data = data[n:]
                    if not data:
                        return
            if time.monotonic() > deadline or self.closed.is_set():
                raise TimeoutError(f"stream {sid}: the server's flow-control window stayed closed")
            time.sleep(0.005)

    def status(self, sid: int) -> str | None:
        with self._lock:
            return self.ended.get(sid)

    def close(self) -> None:
        try:
            with self._lock:
                self.conn.close_connection()
                self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
