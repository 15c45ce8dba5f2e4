"""A loopback stand-in for the GDC API, for fault tests of the GDC client and downloads.

It answers ``/files`` and ``/cases`` searches (filters with and/or/in/=, fields, size/from
pagination), ``/files/<uuid>`` metadata and ``/data/<uuid>`` downloads with Range support.
Each file carries a *script* of faults played on its successive ``/data`` requests:

- ``"ok"``: serve the file (honouring Range);
- ``("cut", n)``: promise the whole body, send ``n`` bytes, close the connection;
- ``("corrupt",)``: the whole body with bytes flipped in the middle;
- ``("status", code, retry_after)``: an error status, with a Retry-After header unless None;
- ``("ignore_range",)``: the whole file with 200, whatever the Range header says.

Searches have a script of their own (``search_script``): ``("status", code, retry_after)``
or ``("garbage",)`` (a JSON answer that is not a search result). Once a script is used up,
requests are served normally. The server listens on 127.0.0.1 on
a free port, logs every request (time, path, Range, token), and stops by itself after
``max_seconds`` or ``max_requests``, so a test that goes wrong cannot hang or loop.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


@dataclass
class MockFile:
    file_id: str
    file_name: str
    data: bytes
    project_id: str = "TCGA-HNSC"
    case_submitter_id: str = "TCGA-CR-7395"
    experimental_strategy: str = "Diagnostic Slide"
    access: str = "open"
    #: the file name the server puts in Content-Disposition and metadata (default: file_name)
    served_name: str | None = None
    script: list = field(default_factory=list)
    #: seconds to wait before sending a body (makes parallel connections observable)
    delay: float = 0.0
    #: whether /files/<uuid> metadata names the file (else only Content-Disposition does)
    metadata_name: bool = True

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()

    def record(self) -> dict:
        record = {
            "id": self.file_id,
            "file_id": self.file_id,
            "file_name": self.served_name or self.file_name,
            "md5sum": self.md5,
            "file_size": len(self.data),
            "state": "released",
            "access": self.access,
            "data_type": "Slide Image",
            "data_format": "SVS",
            "experimental_strategy": self.experimental_strategy,
            "cases": [{"submitter_id": self.case_submitter_id, "case_id": f"case-{self.case_submitter_id}",
                       "project": {"project_id": self.project_id}}],
        }
        if not self.metadata_name:
            del record["file_name"]
        return record


@dataclass
class RequestRecord:
    time: float
    method: str
    path: str
    range: str | None
    token: str | None
    status: int = 0
    bytes_sent: int = 0


def _values(obj, path: list[str]):
    """All values at a dotted path through nested dicts and lists."""
    if isinstance(obj, list):
        return [v for item in obj for v in _values(item, path)]
    if not path:
        return [obj]
    if not isinstance(obj, dict) or path[0] not in obj:
        return []
    return _values(obj[path[0]], path[1:])


def matches(record: dict, node: dict | None, endpoint: str) -> bool:
    """Evaluate a GDC filters tree (and, or, in, =, !=) on one record."""
    if not node:
        return True
    op = node["op"].lower()
    if op == "and":
        return all(matches(record, n, endpoint) for n in node["content"])
    if op == "or":
        return any(matches(record, n, endpoint) for n in node["content"])
    content = node["content"]
    field_path = content["field"]
    if field_path.startswith(endpoint + "."):
        field_path = field_path[len(endpoint) + 1:]
    wanted = content["value"] if isinstance(content["value"], list) else [content["value"]]
    found = _values(record, field_path.split("."))
    if op in ("in", "="):
        return any(v in wanted for v in found)
    if op == "!=":
        return not any(v in wanted for v in found)
    raise ValueError(f"filter op {op!r} not supported by the mock")


class MockGDC:
    """The mock server; use as a context manager, ``url`` is its base URL."""

    def __init__(self, files=(), cases=(), token: str | None = None, search_script=(), max_requests: int = 200,
                 max_seconds: float = 60.0):
        self.files = {f.file_id: f for f in files}
        self.search_script = list(search_script)
        self.cases = list(cases)
        self.token = token
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.log: list[RequestRecord] = []
        self.max_active_data = 0
        self._active_data = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(max_seconds, self.stop)
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "MockGDC":
        self._thread.start()
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self._timer.cancel()
            # shutdown() waits for serve_forever, so never call it from the server's own thread
            threading.Thread(target=self._shutdown, daemon=True).start()

    def _shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def data_requests(self, file_id: str | None = None) -> list[RequestRecord]:
        prefix = "/data/" + (file_id or "")
        return [r for r in self.log if r.path.startswith(prefix)]

    # ------------------------------------------------------------------ handler

    def _handler_class(self):
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _start(self) -> RequestRecord | None:
                rec = RequestRecord(time.monotonic(), self.command, self.path, self.headers.get("Range"),
                                    self.headers.get("X-Auth-Token"))
                with mock._lock:
                    mock.log.append(rec)
                    over = len(mock.log) > mock.max_requests
                if over:
                    mock.stop()
                    self._json(503, {"message": "mock server request budget used up"}, rec)
                    return None
                return rec

            def _json(self, status: int, obj, rec: RequestRecord, headers: dict | None = None) -> None:
                body = json.dumps(obj).encode()
                # recorded before anything is sent: a client may read the reply (and a test the
                # record) before this thread runs another line
                rec.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _params(self) -> dict:
                url = urlparse(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                if self.command == "POST":
                    length = int(self.headers.get("Content-Length") or 0)
                    if length:
                        params.update(json.loads(self.rfile.read(length)))
                if isinstance(params.get("filters"), str):
                    params["filters"] = json.loads(params["filters"])
                return params

            def do_GET(self):
                self._route()

            def do_POST(self):
                self._route()

            def _route(self):
                rec = self._start()
                if rec is None:
                    return
                path = urlparse(self.path).path.rstrip("/")
                if path in ("/files", "/cases"):
                    self._search(path.strip("/"), rec)
                elif path.startswith("/files/"):
                    f = mock.files.get(path.split("/")[-1])
                    if f is None:
                        self._json(404, {"message": "not found"}, rec)
                    else:
                        self._json(200, {"data": f.record(), "warnings": {}}, rec)
                elif path.startswith("/data/"):
                    self._data(path.split("/")[-1], rec)
                else:
                    self._json(404, {"message": f"no endpoint {path}"}, rec)

            def _search(self, endpoint: str, rec: RequestRecord) -> None:
                params = self._params()
                with mock._lock:
                    action = mock.search_script.pop(0) if mock.search_script else "ok"
                if action[0] == "status":
                    headers = {} if action[2] is None else {"Retry-After": str(action[2])}
                    self._json(action[1], {"message": f"mock {action[1]}"}, rec, headers)
                    return
                if action[0] == "garbage":
                    self._json(200, {"message": "not a search result"}, rec)
                    return
                records = [f.record() for f in mock.files.values()] if endpoint == "files" else mock.cases
                try:
                    hits = [r for r in records if matches(r, params.get("filters"), endpoint)]
                except (KeyError, ValueError) as exc:
                    self._json(400, {"message": str(exc)}, rec)
                    return
                start, size = int(params.get("from", 0)), int(params.get("size", 10))
                page = hits[start:start + size]
                pagination = {"count": len(page), "total": len(hits), "from": start, "size": size,
                              "page": start // max(size, 1) + 1, "pages": -(-len(hits) // max(size, 1))}
                self._json(200, {"data": {"hits": page, "pagination": pagination}, "warnings": {}}, rec)

            def _data(self, file_id: str, rec: RequestRecord) -> None:
                f = mock.files.get(file_id)
                if f is None:
                    self._json(404, {"message": "file not found"}, rec)
                    return
                if f.access == "controlled":
                    if rec.token is None:
                        self._json(401, {"message": "token required"}, rec)
                        return
                    if rec.token != mock.token:
                        self._json(403, {"message": "token expired"}, rec)
                        return
                with mock._lock:
                    action = f.script.pop(0) if f.script else "ok"
                    mock._active_data += 1
                    mock.max_active_data = max(mock.max_active_data, mock._active_data)
                try:
                    self._serve_file(f, action, rec)
                finally:
                    with mock._lock:
                        mock._active_data -= 1

            def _serve_file(self, f: MockFile, action, rec: RequestRecord) -> None:
                kind = action if isinstance(action, str) else action[0]
                if kind == "status":
                    headers = {} if action[2] is None else {"Retry-After": str(action[2])}
                    self._json(action[1], {"message": f"mock {action[1]}"}, rec, headers)
                    return
                data = f.data
                if kind == "corrupt":
                    mid = len(data) // 2
                    data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
                start = 0
                m = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m and kind != "ignore_range":
                    start = int(m.group(1))
                    if start >= len(data):
                        rec.status = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                rec.status = 206 if start else 200
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                name = f.served_name or f.file_name
                self.send_header("Content-Disposition", f'attachment; filename="{name}"')
                self.end_headers()
                if f.delay:
                    time.sleep(f.delay)
                if kind == "cut":
                    body = body[: action[1]]
                    self.close_connection = True
                rec.bytes_sent = len(body)  # recorded before the client can have it
                self.wfile.write(body)
                self.wfile.flush()

        return Handler
