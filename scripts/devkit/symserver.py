"""A loopback symbol server for tests and demos: a directory in the symstore layout over HTTP.

Microsoft's symbol servers answer `GET <root>/<file>/<key>/<file>` with the file or 404; that is all a
client of `srv*<cache>*<url>` needs. This one serves `root` on 127.0.0.1 (a free port), records every
request (path and the status it got) and can be told to misbehave: answer every request (or those
whose path contains a text) with a given status, wait before answering, or drop the connection part
way through a file. Keys are matched exactly,
as a case-sensitive store would: a client that formats them differently is seen to miss.

    with SymbolServer(root) as server:
        server.publish("contosoflt.pdb", "21F7A884E089BE394C4C44205044422E1", pdb_bytes)
        ... srv*<cache>*{server.url} ...
        server.requests  # [("/contosoflt.pdb/21F7.../contosoflt.pdb", 200)]
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class SymbolServer:
    def __init__(self, root: str | Path, *, prefix: str = "/download/symbols"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.requests: list[tuple[str, int]] = []
        self.fail_status: int | None = None  # answer this status instead of serving
        self.fail_matching: str | None = None  # only for paths containing this text (None: every path)
        self.delay = 0.0  # seconds to wait before answering
        self.truncate_to: int | None = None  # send only this many bytes of a file, then drop the connection
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ----------------------------------------------------------------------------------

    def publish(self, name: str, key: str, data: bytes, *, stored_as: str | None = None) -> Path:
        """Puts `data` at `<root>/<name>/<key>/<stored_as or name>` (stored_as: e.g. a `.pd_`)."""
        path = self.root / name / key / (stored_as or name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "SymbolServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server._answer(self)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="symserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "SymbolServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the symbol server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{self.prefix}"

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]

    # -- serving ----------------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = urlsplit(handler.path).path
        if self.delay:
            time.sleep(self.delay)
        status, body = self._resolve(path)
        with self._lock:
            self.requests.append((path, status))
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if status == 200 and self.truncate_to is not None:
                handler.wfile.write(body[:self.truncate_to])
                handler.wfile.flush()
                handler.close_connection = True
                return
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def _resolve(self, path: str) -> tuple[int, bytes]:
        if self.fail_status is not None and (self.fail_matching is None or self.fail_matching in path):
            return self.fail_status, f"{self.fail_status} from the test symbol server\n".encode()
        if not path.startswith(self.prefix + "/"):
            return 404, b""
        parts = [unquote(p) for p in path[len(self.prefix) + 1:].split("/")]
        if len(parts) != 3 or any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
            return 404, b""
        file = self.root.joinpath(*parts)
        if not file.is_file():
            return 404, b""
        return 200, file.read_bytes()
