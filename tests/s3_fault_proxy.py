r"""An HTTP proxy on 127.0.0.1 in front of the test S3 server that injects faults into chosen requests.

    with FaultProxy(upstream="http://127.0.0.1:5000") as proxy:
        fault = proxy.add(Fault("503", method="GET", path=r"\.parquet", every=3))   # every 3rd matching request
        ... point AWS_ENDPOINT_URL at proxy.url ...
        assert fault.injected > 0

A fault applies to requests whose method and path (regex search) match, either to the first `first`
of them or to every `every`-th one; the request that follows a faulted one (the client's retry) is
forwarded unless it is itself an `every`-th. Actions: "500" (InternalError), "503" (SlowDown) with S3's
XML error body; "drop" (the connection closes without an answer); "delay" (forwarded after `delay_s`).
"""
from __future__ import annotations

import http.client
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Fault:
    action: str  # "500" | "503" | "drop" | "delay"
    method: str = ".*"  # regex on the HTTP method
    path: str = ".*"  # regex searched in the path + query
    first: int = 0  # the first N matching requests
    every: int = 0  # or every N-th matching request
    delay_s: float = 0.3
    matched: int = 0
    injected: int = 0

    def __post_init__(self):
        if self.action not in (*ERRORS, "drop", "delay"):
            raise ValueError(f"fault action {self.action!r}: expected 500, 503, drop or delay")
        if bool(self.first) == bool(self.every):
            raise ValueError("a fault needs exactly one of first=N or every=N")

    def hits(self, method: str, path: str) -> bool:
        """Counts a matching request; True when this one is to be faulted."""
        if not (re.fullmatch(self.method, method) and re.search(self.path, path)):
            return False
        self.matched += 1
        hit = self.matched <= self.first if self.first else self.matched % self.every == 0
        self.injected += hit
        return hit


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, action or "ok")

    def __post_init__(self):
        self._lock = threading.Lock()
        target = urlparse(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    raw = b""
                    while True:  # forwarded as sent (aws-chunked payloads carry their own framing inside)
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    fault = next((f for f in proxy.faults if f.hits(self.command, self.path)), None)
                    proxy.log.append((self.command, self.path, fault.action if fault else "ok"))
                if fault is not None and fault.action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault is not None and fault.action in ERRORS:
                    status, reason, code, message = ERRORS[fault.action]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                           f'</Message><RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>').encode()
                    self.send_response(status, reason)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                if fault is not None and fault.action == "delay":
                    time.sleep(fault.delay_s)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                        headers["Transfer-Encoding"] = "chunked"
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for key, value in headers.items():
                        conn.putheader(key, value)
                    conn.endheaders(body or None)
                    answer = conn.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
