"""The OpenAI backend through the real ``openai`` client against a local fake API.

Every test talks HTTP to :class:`fake_openai.FakeOpenAI` on 127.0.0.1; nothing leaves
the machine. Client timeout 0.5 s and backoff 0.05 s keep the fault tests to seconds.
"""
from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pytest
import torch
from fake_openai import FakeOpenAI

from mrilib.synthetic import BudgetExceeded, Refused, generate_cached, read_manifest
from mrilib.synthetic.openai_backend import APIFailure, OpenAIBackend, retry_after_seconds

KEY = "sk-test-SECRET123"
FAST = {"timeout_s": 0.5, "backoff_s": 0.05, "upload_size": 256}


def slices(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth fake slices (a bright disk on a ramp): they survive resizing nearly intact."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 128), torch.linspace(-1, 1, 128), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.6
        r = 0.3 + 0.3 * torch.rand(1, generator=g)
        disk = (((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2).float()
        out.append((40 + 150 * disk + 30 * xx).round().to(torch.uint8))
    return torch.stack(out).unsqueeze(1)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


@pytest.fixture
def server():
    with FakeOpenAI(timeout_sleep=1.0) as s:
        yield s


def backend(server, **kw) -> OpenAIBackend:
    return OpenAIBackend(base_url=server.base_url, **{**FAST, **kw})


def one(b: OpenAIBackend) -> torch.Tensor:
    return b.generate(slices(1), torch.tensor([0]), [0])


def gaps(server) -> list[float]:
    t = [r["t"] for r in server.requests]
    return [b - a for a, b in zip(t, t[1:])]


# ----------------------------------------------------------------------------- happy path

def test_edit_route_uploads_png_and_returns_gray128(server):
    src = slices(3)
    out = backend(server).generate(src, torch.tensor([0, 1, 2]), [1, 2, 3])
    assert out.shape == (3, 1, 128, 128) and out.dtype == torch.uint8
    # The fake answers the inverted upload: the round trip through PNG, base64 and two
    # resizes must keep the picture.
    assert (out.float() - (255 - src.float())).abs().mean() < 6
    req = server.requests[0]
    assert req["path"] == "/v1/images/edits" and len(server.requests) == 3
    assert req["fields"]["model"] == "gpt-image-2" and "MRI" in req["fields"]["prompt"]
    assert req["fields"]["n"] == "1" and req["image_size"] == (256, 256)
    assert req["auth"] == f"Bearer {KEY}"


def test_variations_make_n_per_image(server):
    out = backend(server).variations(slices(2), torch.tensor([0, 3]), n=2, seed=5)
    assert out.shape == (2, 2, 1, 128, 128) and out.dtype == torch.uint8
    assert len(server.answered()) == 4


def test_thesis_call_is_recorded_and_its_retirement_explained(server):
    b = backend(server, route="variation")
    with pytest.raises(APIFailure, match="retired on 2026-05-12") as err:
        one(b)
    assert "route='edit'" in str(err.value)
    req, = server.requests  # a 404 is not retried
    assert req["path"] == "/v1/images/variations"
    assert req["fields"] == {"model": "dall-e-2", "n": "1", "size": "256x256",
                             "response_format": "b64_json"}
    assert req["image_size"] == (256, 256)


# ----------------------------------------------------------------------------- faults

@pytest.mark.parametrize("script, attempts", [
    (["500", "500"], 3),
    (["timeout"], 2),
    (["malformed"], 2),
    (["nodata"], 2),
    (["429:0"], 2),
])
def test_transient_fault_is_retried_then_succeeds(server, script, attempts):
    server.script = list(script)
    out = one(backend(server))
    assert out.shape == (1, 1, 128, 128)
    assert len(server.requests) == attempts
    assert server.requests[-1]["action"] == "ok"


@pytest.mark.parametrize("action, at_least", [("429:1", 0.9), ("429:date+2", 0.95)])
def test_retry_after_is_honoured(server, action, at_least):
    # An HTTP date has whole seconds: "now + 2 s" leaves between 1 and 2 s to wait.
    server.script = [action]
    one(backend(server))
    wait, = gaps(server)
    assert at_least <= wait < at_least + 2.5


def test_backoff_doubles(server):
    server.script = ["500", "500", "500"]
    one(backend(server, backoff_s=0.15))
    g = gaps(server)
    assert [round(x, 2) >= w * 0.9 for x, w in zip(g, (0.15, 0.3, 0.6))] == [True] * 3


def test_gives_up_after_max_attempts(server):
    server.script = ["500"] * 10
    with pytest.raises(APIFailure, match="all 3 attempts"):
        one(backend(server, max_attempts=3))
    assert len(server.requests) == 3


def test_a_5xx_retry_after_is_honoured_too(server):
    server.script = ["503:1"]
    one(backend(server))
    wait, = gaps(server)
    assert 0.9 <= wait < 3.0


@pytest.mark.parametrize("action, match", [
    ("quota", "quota is used up"),
    ("url", "URL instead of b64_json"),
])
def test_answers_that_asking_again_cannot_fix_stop_at_once(server, action, match):
    server.script = [action] * 5
    with pytest.raises(APIFailure, match=match):
        one(backend(server))
    assert len(server.requests) == 1


@pytest.mark.parametrize("script", [["timeout"] * 5, ["drop"] * 5, ["drop", "timeout"]])
def test_unanswered_requests_are_retried_once_since_each_may_be_billed(server, script):
    server.script = list(script)
    b = backend(server)
    with pytest.raises(APIFailure, match="2 unanswered requests for one image"):
        one(b)
    assert len(server.requests) == 2 and b.requests_billed == 2


def test_a_dropped_connection_is_retried_and_counted(server):
    server.script = ["drop"]
    b = backend(server)
    assert one(b).shape == (1, 1, 128, 128)
    assert [r["action"] for r in server.requests] == ["drop", "ok"]
    assert b.requests_billed == 2  # the dropped request may have been made and billed


def closed_port_url() -> str:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def transport_of(b: OpenAIBackend):
    """The openai client's HTTP library (httpx for openai 1.x, httpx2 for 3.x)."""
    import importlib

    client_class = next(c for c in type(b._client._client).__mro__
                        if not c.__module__.startswith("openai"))
    return importlib.import_module(client_class.__module__.split(".")[0])


def no_waiting(*args):
    raise AssertionError("waited before stopping")


@pytest.mark.parametrize("url, cause", [
    (None, "ConnectError"),              # nothing listens on the port
    ("127.0.0.1:9/v1", "UnsupportedProtocol"),  # no scheme: a URL the client cannot use
    ("timeout", "ConnectTimeout"),       # the connection was not made in time
])
def test_an_unreachable_api_stops_at_once_before_any_answer(monkeypatch, url, cause):
    import openai

    b = OpenAIBackend(base_url=closed_port_url() if url in (None, "timeout") else url, **FAST)
    if url == "timeout":
        transport = transport_of(b)

        def slow_connect(image):
            err = openai.APITimeoutError(request=transport.Request("POST", "http://x"))
            raise err from transport.ConnectTimeout("timed out")
        monkeypatch.setattr(b, "_request", slow_connect)
    monkeypatch.setattr("time.sleep", no_waiting)  # a backoff would fail here
    with pytest.raises(APIFailure, match=rf"cannot reach the OpenAI API at .*: .*{cause}.*"
                                         r"check the network and base_url"):
        one(b)
    assert b.requests_billed == 0  # nothing was sent


def test_unreachable_after_an_answer_is_a_blip_retried_with_backoff(server, monkeypatch):
    import openai

    b = backend(server)
    one(b)  # the API answered once in this run
    transport = transport_of(b)
    real, fails = b._request, []

    def flaky(image):
        if not fails:
            fails.append(1)
            err = openai.APIConnectionError(request=transport.Request("POST", server.base_url))
            raise err from transport.ConnectError("connection refused")
        return real(image)

    monkeypatch.setattr(b, "_request", flaky)
    assert one(b).shape == (1, 1, 128, 128) and fails == [1]
    assert b.requests_billed == 2  # nothing was sent by the refused connection
    server.stop()  # now it stays away: the retries run out, with a message that says where
    b.cfg["max_attempts"] = 3
    with pytest.raises(APIFailure, match=r"could not reach http://127\.0\.0\.1:\d+/v1 in 3 "
                                         r"attempts; finished images are kept"):
        one(b)
    assert b.requests_billed == 2


def test_variations_announce_every_request_before_the_first(server, capsys):
    b = backend(server)
    b.variations(slices(2), torch.tensor([0, 1]), n=3, seed=0)
    err = capsys.readouterr().err
    assert err.count("openai:") == 1 and "6 request(s)" in err
    assert len(server.requests) == 6


def test_too_long_retry_after_stops_instead_of_waiting(server):
    server.script = ["429:3600"]
    with pytest.raises(APIFailure, match="Retry-After"):
        one(backend(server, max_retry_after_s=60))
    assert len(server.requests) == 1


def test_malformed_answers_are_retried_a_bounded_number_of_times(server):
    server.script = ["malformed"] * 5
    with pytest.raises(APIFailure, match="malformed 2 time.*not valid JSON"):
        one(backend(server, malformed_retries=1))
    assert len(server.requests) == 2


@pytest.mark.parametrize("action, code", [("refuse", "content_policy_violation"),
                                          ("moderation", "moderation_blocked")])
def test_content_policy_refusal_is_a_refusal_not_a_failure(server, action, code):
    server.script = [action]
    with pytest.raises(Refused, match=code):
        one(backend(server))
    assert len(server.requests) == 1


def test_refusal_is_recorded_and_the_run_goes_on(server, tmp_path):
    b, src, labels = backend(server), slices(3), torch.tensor([0, 1, 2])
    server.script = ["ok", "refuse", "ok"]
    out, report = generate_cached(b, src, labels, ["a", "b", "c"], 1, seed=0,
                                  cache_root=tmp_path, progress=False)
    assert (report["generated"], report["refused"], report["missing"]) == (2, 1, 1)
    assert report["ok"].tolist() == [[True], [False], [True]]
    assert out[1].sum() == 0
    rows = read_manifest(report["dir"])
    assert [(r["source_id"], r["status"]) for r in rows] == [
        ("a", "ok"), ("b", "refused"), ("c", "ok")]
    assert "content_policy_violation" in rows[1]["reason"] and rows[1]["class"] == 1

    _, again = generate_cached(b, src, labels, ["a", "b", "c"], 1, seed=0,
                               cache_root=tmp_path, progress=False)
    assert len(server.requests) == 3 and (again["cached"], again["refused"]) == (2, 1)

    _, retried = generate_cached(b, src, labels, ["a", "b", "c"], 1, seed=0, cache_root=tmp_path,
                                 progress=False, retry_refused=True)
    assert len(server.requests) == 4 and (retried["generated"], retried["refused"]) == (1, 0)
    assert retried["ok"].all()


# ----------------------------------------------------------------------------- budget

@pytest.mark.parametrize("limits, calls", [({"max_images": 2}, 2),
                                           ({"max_images": 0}, 0),
                                           ({"max_cost": 0.05, "usd_per_image": 0.02}, 2)])
def test_budget_stops_before_it_is_exceeded(server, tmp_path, capsys, limits, calls):
    b = backend(server, **limits)
    out, report = generate_cached(b, slices(5), torch.zeros(5, dtype=torch.long),
                                  [f"s{i}" for i in range(5)], 1, seed=0, cache_root=tmp_path,
                                  progress=False)
    assert len(server.requests) == calls
    assert report["generated"] == calls and report["missing"] == 5 - calls
    assert "stopped before exceeding" in report["stopped"]
    err = capsys.readouterr().err
    assert "5 request(s)" in err and "$" in err  # the estimate came before any request


def test_budget_counts_every_image_of_the_run(server):
    b = backend(server, max_images=3)
    b.generate(slices(2), torch.tensor([0, 0]), [0, 1])
    with pytest.raises(BudgetExceeded, match="max_images=3"):
        b.generate(slices(2), torch.tensor([0, 0]), [2, 3])
    assert len(server.requests) == 3


def test_estimate_is_printed_before_the_first_request(server, capsys):
    b = backend(server, usd_per_image=0.25)
    one(b)
    assert "1 request(s) x $0.250" in capsys.readouterr().err


# ----------------------------------------------------------------------------- settings

def test_missing_key_names_the_variable(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY is not set"):
        backend(server)


@pytest.mark.parametrize("kw, match", [({"route": "dalle"}, "route='dalle'"),
                                       ({"model": "gpt-image-9"}, "usd_per_image"),
                                       ({"max_cost": -1.0}, "max_cost=-1.0")])
def test_bad_settings_are_named(server, kw, match):
    with pytest.raises(ValueError, match=match):
        backend(server, **kw)


@pytest.mark.parametrize("headers, seconds", [({"retry-after": "3"}, 3.0),
                                              ({"retry-after": "0.5"}, 0.5),
                                              ({"retry-after-ms": "250"}, 0.25),
                                              ({"retry-after": "soon"}, None),
                                              ({"retry-after": "1e400"}, float("inf")),
                                              ({}, None)])
def test_retry_after_parsing(headers, seconds):
    assert retry_after_seconds(headers) == seconds


def test_registry_builds_it(server):
    from mrilib.synthetic import get_backend

    b = get_backend("openai", base_url=server.base_url, **FAST)
    assert isinstance(b, OpenAIBackend) and b.max_batch == 1


def test_params_key_the_cache_without_secrets(server):
    b = OpenAIBackend(base_url=server.base_url.replace("http://", "http://user:hunter2@"), **FAST)
    text = json.dumps(b.params()) + repr(b)
    assert "hunter2" not in text and KEY not in text
    assert b.params()["model"] == "gpt-image-2"


# ----------------------------------------------------------------------------- the key

def test_key_never_reaches_output_logs_cache_or_errors(server, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    b = backend(server, max_attempts=2)
    seen = [repr(b), json.dumps(b.params())]
    server.script = ["echo_key", "echo_key:400", "500", "500", "refuse", "malformed", "ok",
                     "timeout", "ok", "429:0"]
    for _ in range(6):
        try:
            one(b)
        except Exception as err:  # noqa: BLE001 -- every kind of error is checked below
            seen += [str(err), repr(err), "".join(traceback.format_exception(err))]
    generate_cached(b, slices(3), torch.tensor([0, 1, 2]), ["a", "b", "c"], 1, seed=0,
                    cache_root=tmp_path)
    captured = capsys.readouterr()
    seen += [captured.out, captured.err, caplog.text]
    seen += [p.read_bytes().decode("latin-1") for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(r.name.startswith("openai") for r in caplog.records)  # the client's debug log was on
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)  # the key was in play
    assert "Incorrect API key provided: ***" in " ".join(seen)  # echoed, then redacted
    assert not [s for s in seen if "SECRET123" in s]


@pytest.mark.parametrize("script", [["echo_key"], ["echo_key:500"] * 3, ["refuse"], ["quota"],
                                    ["drop"] * 2])
def test_no_error_keeps_the_request_or_its_answer_within_reach(server, script):
    # A traceback that shows locals (pytest --showlocals, IPython verbose, Sentry) walks
    # the exception chain and every frame: the openai error, with the request's
    # Authorization header and the server's text, must not be in it.
    server.script = list(script)
    with pytest.raises(Exception) as caught:
        one(backend(server, max_attempts=3))
    err = caught.value
    assert err.__context__ is None and err.__cause__ is None
    shown = "".join(traceback.TracebackException.from_exception(
        err, capture_locals=True).format())
    assert "SECRET123" not in shown and "Bearer" not in shown


def test_an_error_answer_shows_the_api_is_reachable(server, monkeypatch):
    import openai

    server.script = ["500"]  # answered, with an error: the API is there
    b = backend(server)
    transport, real, calls = transport_of(b), b._request, []

    def refused_once_after_the_answer(image):
        calls.append(1)
        if len(calls) == 2:
            err = openai.APIConnectionError(request=transport.Request("POST", server.base_url))
            raise err from transport.ConnectError("connection refused")
        return real(image)

    monkeypatch.setattr(b, "_request", refused_once_after_the_answer)
    assert one(b).shape == (1, 1, 128, 128) and len(calls) == 3
    assert [r["action"] for r in server.requests] == ["500", "ok"]
