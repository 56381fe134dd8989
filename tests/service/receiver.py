"""A real webhook receiver for the tests: a threaded http.server on 127.0.0.1 that checks every
delivery's signature with standardwebhooks itself."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook as Verifier
from standardwebhooks import WebhookVerificationError


class Receiver:
    """An HTTP server that records every POST by path, with the signature checked against the path's
    secret, and answers each path's scripted statuses in turn (then 200)."""

    def __init__(self):
        self.secrets: dict[str, str] = {}
        self.script: dict[str, list[int]] = {}
        self.got: dict[str, list[dict]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.record(self.path, dict(self.headers), body)
                with receiver.lock:
                    script = receiver.script.get(self.path) or []
                    status = script.pop(0) if script else 200
                answer = b"ok" if status == 200 else b"try again later"
                self.send_response(status)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def record(self, path: str, headers: dict, body: bytes) -> None:
        secret = self.secrets[path]
        verifier = Verifier(secret) if secret.startswith("whsec_") else Verifier(secret.encode())
        try:
            event, verified = verifier.verify(body, headers), True
        except WebhookVerificationError:
            event, verified = json.loads(body), False
        with self.lock:
            self.got.setdefault(path, []).append({"event": event, "verified": verified, "id": headers["webhook-id"],
                                                  "host": next(v for k, v in headers.items() if k.lower() == "host")})

    def events(self, path: str) -> list[dict]:
        with self.lock:
            return list(self.got.get(path, []))

    def wait_for(self, path: str, count: int, timeout_s: float = 60) -> list[dict]:
        """What `path` got, once it got at least `count` deliveries."""
        deadline = time.monotonic() + timeout_s
        while len(self.events(path)) < count:
            assert time.monotonic() < deadline, f"{path} got {self.events(path)} in {timeout_s}s, not {count}"
            time.sleep(0.1)
        return self.events(path)
