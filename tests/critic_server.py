"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the critique tests (no network, no model).

``POST /v1/chat/completions`` replies with a fixed critique that depends on the request: the tag
``[[...]]`` found in the user message (the tests put the rollout id there). A ``behaviour(tag,
attempt)`` function picks, per request, one of: ``("ok",)``, ``("status", 500)``, ``("stall", s)``
(sleep ``s`` seconds before answering -- past the client's timeout), ``("drop",)`` (close the socket
without a reply), ``("hang",)`` (hold the request until :meth:`release` is called). Requests are
counted per tag; the Authorization header of each request is recorded for the API-key checks.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_TAG = re.compile(r"\[\[([^\]]+)\]\]")


def reply_for(tag: str) -> str:
    return f"Critique of {tag}: the second step adds instead of multiplying; redo it."


class CriticServer:
    def __init__(self, behaviour=lambda tag, attempt: ("ok",), require_key: str | None = None):
        self.behaviour = behaviour
        self.require_key = require_key
        self.counts: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.auth_headers: list[str | None] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                content = body["messages"][0]["content"]
                m = _TAG.search(content)
                tag = m.group(1) if m else "?"
                auth = self.headers.get("Authorization")
                with outer.lock:
                    outer.counts[tag] += 1
                    attempt = outer.counts[tag]
                    outer.auth_headers.append(auth)
                if outer.require_key is not None and auth != f"Bearer {outer.require_key}":
                    return self._send(401, {"error": {"message": "bad key"}})
                action = outer.behaviour(tag, attempt)
                if action[0] == "status":
                    return self._send(action[1], {"error": {"message": "server error"}})
                if action[0] == "stall":
                    time.sleep(action[1])
                elif action[0] == "hang":
                    outer.released.wait(30)
                elif action[0] == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return None
                with outer.lock:
                    outer.answered[tag] += 1
                return self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                        "choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": reply_for(tag)}}]})

            def _send(self, status: int, obj: dict):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout) before we answered
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> "CriticServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
