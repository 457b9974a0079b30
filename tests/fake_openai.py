"""An OpenAI-compatible image API on 127.0.0.1, for tests: real HTTP, scripted faults.

    with FakeOpenAI() as server:
        server.script = ["429:1", "500", "ok"]      # one action per request, then "ok"
        client = OpenAI(api_key=..., base_url=server.base_url)

Handles ``POST /v1/images/edits`` and ``POST /v1/images/variations``: parses the
multipart upload, checks that an image part arrived and is a valid PNG (answering 400
otherwise, so a test that uploads the wrong thing fails), and answers ``b64_json`` with a
real PNG: the upload inverted (255 - x), so a test can check the round trip.

Actions: ``ok``; ``429:<Retry-After>`` (seconds, or ``date+<s>`` for an HTTP date);
``500``; ``503:<Retry-After>``; ``quota`` (429 insufficient_quota); ``url`` (200 with a
URL instead of b64_json); ``timeout`` (answers after ``timeout_sleep`` seconds, longer than
the test client's timeout); ``refuse`` (400 content_policy_violation); ``moderation`` (400
moderation_blocked); ``malformed`` (200 with a body that is not JSON); ``nodata`` (200
JSON without image data); ``echo_key[:<status>]`` (401, or the status given, echoing the
Authorization header as the real API echoes part of a wrong key); ``drop`` (reads the
request, then closes the connection without an answer); ``hold`` (blocks until
:meth:`release`, never answered: a request cut off by a killed client). ``dall-e-2`` always gets the
retired-model 404. Every request is recorded in ``requests`` with its arrival time.
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageOps

LIFETIME_S = 300  # a server a test forgot to stop shuts itself down after this


class FakeOpenAI:
    """The server as a context manager; ``script``, ``hold_after`` and ``delay`` steer it."""

    def __init__(self, timeout_sleep: float = 1.5, delay: float = 0.0, answer_size: int = 256):
        self.timeout_sleep = timeout_sleep  # seconds a "timeout" answer takes
        self.delay = delay                  # seconds every answer takes (to slow a run)
        self.answer_size = answer_size      # pixels per side of the answer PNG
        self.script: list[str] = []
        self.hold_after: int | None = None  # requests after this many are held
        self.requests: list[dict] = []
        self.held = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._watchdog = threading.Timer(LIFETIME_S, self.stop)
        self._watchdog.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._watchdog.cancel()
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()

    def release(self) -> None:
        """Let held requests go (their clients are gone; nothing is answered)."""
        self._release.set()

    def answered(self) -> list[dict]:
        """The requests that got an image back."""
        return [r for r in self.requests if r["action"] == "ok"]

    def _next_action(self, model: str, path: str) -> tuple[dict, str]:
        with self._lock:
            record = {"t": time.monotonic(), "path": path, "model": model}
            n = len(self.requests)
            self.requests.append(record)
            if model == "dall-e-2":
                action = "retired"
            elif self.hold_after is not None and n >= self.hold_after:
                action = "hold"
            else:
                action = self.script.pop(0) if self.script else "ok"
            record["action"] = action
            return record, action

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                if self.path not in ("/v1/images/edits", "/v1/images/variations"):
                    return self._json(404, _error("not found", "invalid_request_error", None))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    fields, png = _parse_multipart(self.headers.get("Content-Type", ""), body)
                except ValueError as err:
                    return self._json(400, _error(str(err), "invalid_request_error", None))
                record, action = server._next_action(fields.get("model", ""), self.path)
                record.update(fields=fields, image_sha=hashlib.sha1(png.tobytes()).hexdigest(),
                              image_size=png.size, auth=self.headers.get("Authorization", ""))
                self._act(action, png)

            def _act(self, action: str, png: Image.Image) -> None:
                time.sleep(server.delay + (server.timeout_sleep if action == "timeout" else 0))
                if action == "hold":
                    server.held.set()
                    server._release.wait(LIFETIME_S)
                elif action == "drop":  # the client sees the connection close, no answer
                    self.close_connection = True
                elif action == "ok":
                    b64 = _answer_b64(png, server.answer_size)
                    self._json(200, {"created": int(time.time()), "data": [{"b64_json": b64}]})
                elif action == "malformed":
                    self._raw(200, b'{"created": 1, "data": [{"b64_json": "iVBOR',
                              "application/json")
                elif action.startswith("503:"):
                    self._json(503, _error("Service unavailable", "server_error", None),
                               {"Retry-After": action[4:]})
                elif action.startswith("429:"):
                    value = action[4:]
                    if value.startswith("date+"):
                        value = email.utils.formatdate(time.time() + float(value[5:]), usegmt=True)
                    self._json(429, _error("Rate limit reached", "requests", "rate_limit_exceeded"),
                               {"Retry-After": value})
                elif action.startswith("echo_key"):
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    self._json(int(action.partition(":")[2] or 401),
                               _error(f"Incorrect API key provided: {key}.",
                                      "invalid_request_error", "invalid_api_key"))
                elif action in CANNED:
                    self._json(*CANNED[action])
                else:
                    raise AssertionError(f"unknown scripted action {action!r}")

            def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
                self._raw(status, json.dumps(payload).encode(), "application/json", headers)

            def _raw(self, status: int, body: bytes, ctype: str,
                     headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

        return Handler


def _error(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


CANNED = {  # action -> (status, body) of the answers that never vary
    "500": (500, _error("The server had an error", "server_error", None)),
    "timeout": (500, _error("too late", "server_error", None)),  # after the client gave up
    "refuse": (400, _error("Your request was rejected as a result of our safety system.",
                           "invalid_request_error", "content_policy_violation")),
    "moderation": (400, _error("Rejected by the safety system.", "image_generation_user_error",
                               "moderation_blocked")),
    "nodata": (200, {"created": 1, "data": []}),
    "url": (200, {"created": 1, "data": [{"url": "https://example.invalid/image.png"}]}),
    "quota": (429, _error("You exceeded your current quota, please check your plan and "
                          "billing details.", "insufficient_quota", "insufficient_quota")),
    "retired": (404, _error("The model `dall-e-2` does not exist or you do not have access to "
                            "it.", "invalid_request_error", "model_not_found")),
}


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict, Image.Image]:
    """(form fields, uploaded PNG) of a multipart/form-data body; ValueError if unusable."""
    if not content_type.startswith("multipart/form-data"):
        raise ValueError(f"expected a multipart/form-data upload, got {content_type!r}")
    msg = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields, png = {}, None
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if part.get_filename() is None:
            fields[name] = payload.decode()
            continue
        if name != "image" or not payload.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"file part {name!r} is not a PNG image upload")
        png = Image.open(io.BytesIO(payload))
        png.load()
    if png is None:
        raise ValueError("no image part in the upload")
    return fields, png


def _answer_b64(upload: Image.Image, size: int) -> str:
    answer = ImageOps.invert(upload.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    answer.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
