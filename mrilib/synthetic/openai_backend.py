"""Variations from the OpenAI image API: the thesis's DALL-E 2 call and today's route.

The thesis (ch. 2.2) called DALL-E 2's image-variation endpoint::

    client.images.create_variation(model="dall-e-2", image=..., n=1, size="256x256",
                                   response_format="b64_json")

OpenAI retired DALL-E 2 and that endpoint on 2026-05-12. It is kept as ``route="variation"``
for the record; its model-not-found answer becomes an error that says so. The default
``route="edit"`` calls ``images.edit`` with a GPT Image model and a prompt asking for a
variation of the slice. Answers are converted back to 128x128 grayscale.

Sending patient scans to a third-party API is data sharing: check consent, IRB approval
and a data-processing agreement first. The local backend keeps scans on the machine.

The key is read from ``OPENAI_API_KEY`` only, handed to the client and never stored
elsewhere; every message that could carry it (the server echoes wrong keys) is redacted.
Retries are ours (the client's ``max_retries`` is 0) so that their count, the backoff and
``Retry-After`` are explicit and tested.
"""
from __future__ import annotations

import base64
import binascii
import email.utils
import io
import json
import logging
import math
import os
import random
import re
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from ..config import design_view, settings
from .base import SIZE, Backend, BudgetExceeded, Refused, check_batch, to_gray128

log = logging.getLogger(__name__)

RETIRED = "2026-05-12"  # DALL-E 2 and the image-variation endpoint stopped answering
ROUTES = ("edit", "variation")
REFUSAL_CODES = ("content_policy_violation", "moderation_blocked")
RETRY_STATUS = {408, 409, *range(500, 600)}  # as the openai client itself retries (besides 429)

DEFAULTS = {
    "route": "edit",              # "edit" (current) or "variation" (the thesis's, retired)
    # gpt-image-1, the model named when this backend was planned, was shut down on
    # 2026-10-23 (openai-python 3.57 docs); gpt-image-2 (2026-04-21) is current.
    "model": "gpt-image-2",
    "prompt": ("A plausible variation of this brain MRI slice: the same axial slice of the "
               "same anatomy, a realistic grayscale axial T1-weighted MRI, with small natural "
               "differences in the shape of ventricles, sulci and gyri. No text, no labels, "
               "no colour, same framing and black background."),
    "size": "1024x1024",          # answer pixels; the smallest standard square of GPT Image
    # Quality "low": the answer is shrunk to 128x128, so detail above that is paid for and
    # thrown away; "low" costs about 1/9 of "medium".
    "quality": "low",
    "upload_size": 1024,          # pixels per side the 128-px source is upscaled to (edit)
    "timeout_s": 180.0,           # per request; GPT Image edits take tens of seconds
    "max_attempts": 6,            # per image, counting the first try
    # Retries of a request sent but unanswered (timed out, dropped): each may be billed, so
    # one, then the run stops (docs/decisions.md#openai-backend; a rerun resumes).
    "max_unanswered_retries": 1,
    "backoff_s": 2.0,             # first wait before a retry (5xx, 429 without Retry-After,
                                  # unanswered, unreachable); doubles each attempt
    "backoff_max_s": 60.0,        # cap on one backoff wait
    "max_retry_after_s": 300.0,   # a Retry-After longer than this stops the run instead
    "malformed_retries": 2,       # extra tries after an answer we cannot read
    # Budgets count this run's requests that may be billed (answered or timed out); a rerun
    # pays only for what the cache lacks, and gets the same budget again.
    "max_images": None,           # budget: requests that may be billed in this run (None: none)
    "max_cost": None,             # budget: USD in this run by usd_per_image (None = no limit)
    "usd_per_image": None,        # overrides the estimate below (USD per request)
    # Estimated USD per request, answer plus upload (docs/decisions.md#openai-backend);
    # check the live pricing page.
    "price_table": {
        "gpt-image-2": {"low": 0.02, "medium": 0.07, "high": 0.23},
        "dall-e-2": {"standard": 0.016},
    },
}
# Quick preset = seminars and tests: a run pays for at most 20 images unless told otherwise.
PRESETS = {"quick": {"max_images": 20}}
# How a run waits, retries and what it may spend, not which images it asks for: left out of
# the cache key and of the grid's design (the rest is route, model, prompt and sizes).
RUN_ONLY = ("timeout_s", "max_attempts", "max_unanswered_retries", "backoff_s",
            "backoff_max_s", "max_retry_after_s", "malformed_retries", "max_images",
            "max_cost", "usd_per_image", "price_table")


def design_settings(**overrides: Any) -> dict:
    """What this backend's images depend on, as in force now: the settings less RUN_ONLY."""
    return design_view(settings(DEFAULTS, PRESETS, **overrides), RUN_ONLY)


class APIFailure(RuntimeError):
    """The API did not give an image after the retries allowed; the message says why."""


def api_key_from_env() -> str:
    """The key in ``OPENAI_API_KEY``, or a ValueError that names the variable."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if not key:
        raise ValueError("OPENAI_API_KEY is not set: export OPENAI_API_KEY=<your key> to use "
                         "the openai backend, or use the local backend (--backend local), "
                         "which needs no key and keeps the scans on this machine")
    return key


class OpenAIBackend(Backend):
    """Variations from the OpenAI image API, one paid request per image."""

    name = "openai"
    max_batch = 1  # each image is paid for: the cache stores it before the next request

    def __init__(self, base_url: str | None = None, **overrides: Any):
        import openai

        self.cfg = settings(DEFAULTS, PRESETS, **overrides)
        self._check_cfg()
        self._client = openai.OpenAI(api_key=api_key_from_env(), base_url=base_url,
                                     max_retries=0, timeout=self.cfg["timeout_s"])
        # Requests in this run that may be billed (answered, or sent and left unanswered:
        # timed out or dropped): what max_images / max_cost count.
        self.requests_billed = 0
        self.requests_answered = 0  # answers of any kind: the API was reachable in this run
        self._announced = False

    # ------------------------------------------------------------------ description

    def params(self) -> dict:
        cfg = self.cfg
        out = {"route": cfg["route"], "endpoint": _public_url(str(self._client.base_url))}
        if cfg["route"] == "variation":  # the retired call fixed its model and size
            return {**out, "model": "dall-e-2", "size": "256x256"}
        return {**out, **design_view(cfg, RUN_ONLY)}

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.params()!r})"

    def model(self) -> str:
        """The model the route in force calls."""
        return "dall-e-2" if self.cfg["route"] == "variation" else self.cfg["model"]

    def usd_per_image(self) -> float:
        """The estimated price of one request with the settings in force."""
        if self.cfg["usd_per_image"] is not None:
            return float(self.cfg["usd_per_image"])
        model = self.model()
        quality = "standard" if self.cfg["route"] == "variation" else self.cfg["quality"]
        price = self.cfg["price_table"].get(model, {}).get(quality)
        if price is None:
            raise ValueError(f"no price estimate for model {model!r} at quality {quality!r}; "
                             f"pass usd_per_image=<USD per image> (--usd-per-image) from "
                             f"OpenAI's pricing page so the budget can be checked")
        return float(price)

    def cost_estimate(self, n_images: int) -> dict:
        per = self.usd_per_image()
        return {"images": int(n_images), "usd_per_image": per, "usd": round(per * n_images, 4),
                "note": f"estimate for {self.model()} as of 2026-11-25; "
                        f"check OpenAI's pricing page"}

    def _check_cfg(self) -> None:
        cfg = self.cfg
        if cfg["route"] not in ROUTES:
            raise ValueError(f"route={cfg['route']!r}: choose 'edit' (GPT Image, current) or "
                             f"'variation' (DALL-E 2, retired on {RETIRED})")
        for name in ("max_images", "max_cost"):
            if cfg[name] is not None and not cfg[name] >= 0:
                raise ValueError(f"{name}={cfg[name]!r}: give a non-negative limit or None")
        if cfg["max_attempts"] < 1:
            raise ValueError(f"max_attempts={cfg['max_attempts']}: needs at least 1")
        self.usd_per_image()  # a missing price is an error before any work, not after

    # ------------------------------------------------------------------ generation

    def generate(self, images: torch.Tensor, labels: torch.Tensor,
                 seeds: Sequence[int]) -> torch.Tensor:
        """One variation per input; seeds are ignored (the API takes none)."""
        images, labels = check_batch(images, labels)
        if not self._announced:
            self.announce(len(images))
        return torch.stack([self._one(img) for img in images])

    def variations(self, images: torch.Tensor, labels: torch.Tensor, n: int,
                   seed: int) -> torch.Tensor:
        """As :meth:`Backend.variations`, announcing all ``len(images) * n`` requests first
        (each :meth:`generate` call here gets one image)."""
        images, labels = check_batch(images, labels)
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one variation per image")
        if not self._announced:
            self.announce(len(images) * int(n))
        return super().variations(images, labels, n, seed)

    def announce(self, n_images: int) -> dict:
        """Print the cost estimate for ``n_images`` and the budget, before any request."""
        est = self.cost_estimate(n_images)
        limits = [f"{k}={self.cfg[k]}" for k in ("max_images", "max_cost")
                  if self.cfg[k] is not None]
        print(f"openai: {est['images']} request(s) x ${est['usd_per_image']:.3f} = "
              f"${est['usd']:.2f} ({est['note']}); budget for this run: "
              f"{', '.join(limits) or 'no limit'}; a request left unanswered (timed out or "
              f"dropped) may be billed and is retried at most "
              f"{self.cfg['max_unanswered_retries']} time(s)",
              file=sys.stderr, flush=True)
        self._announced = True
        return est

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        import openai

        malformed = unanswered = 0
        for attempt in range(1, self.cfg["max_attempts"] + 1):
            self._check_budget()
            failure = None
            try:
                body = self._request(image)
            except openai.OpenAIError as err:
                # Only a redacted snapshot leaves this block: the error holds the request
                # and the server's text (both may carry the key), and __context__ would too.
                failure = _Failure.of(err)
            if failure is not None:
                sent = failure.kind in ("timeout", "dropped")  # the server may have worked
                self.requests_billed += sent
                self.requests_answered += failure.kind == "status"
                unanswered += sent
                if unanswered > self.cfg["max_unanswered_retries"]:
                    raise APIFailure(f"{unanswered} unanswered requests for one image (timed "
                                     f"out or dropped; each may have been billed); finished "
                                     f"images are kept, rerun later to resume")
                wait = self._wait_before_retry(failure, attempt)
                log.warning("openai: %s; waiting %.1f s before attempt %d/%d", failure.summary,
                            wait, attempt + 1, self.cfg["max_attempts"])
                time.sleep(wait)
                continue
            self.requests_billed += 1
            self.requests_answered += 1
            try:
                return _image_from_answer(body)
            except _UrlAnswer as err:
                problem = str(err)
            except ValueError as err:
                malformed += 1
                if malformed <= self.cfg["malformed_retries"]:
                    log.warning("openai: malformed answer (%s); asking again", err)
                    continue
                problem = (f"the API's answer was malformed {malformed} time(s) in a row: "
                           f"{err}. Check base_url / proxy settings")
            raise APIFailure(problem)
        raise APIFailure(f"no image after {self.cfg['max_attempts']} attempts; finished "
                         f"images are kept, rerun later to resume")

    def _check_budget(self) -> None:
        n, cfg = self.requests_billed, self.cfg
        again = ("finished images are kept; a rerun resumes and may spend its own budget "
                 "again (limits count one run's requests)")
        if cfg["max_images"] is not None and n + 1 > cfg["max_images"]:
            raise BudgetExceeded(f"stopped before exceeding max_images={cfg['max_images']} "
                                 f"({n} billed in this run); {again}")
        if cfg["max_cost"] is not None and (n + 1) * self.usd_per_image() > cfg["max_cost"] + 1e-9:
            raise BudgetExceeded(f"stopped before exceeding max_cost=${cfg['max_cost']} "
                                 f"(${n * self.usd_per_image():.3f} estimated for {n} billed "
                                 f"in this run); {again}")

    def _request(self, image: torch.Tensor) -> bytes:
        """The raw body of one successful answer (any error status raises)."""
        cfg = self.cfg
        if cfg["route"] == "variation":
            upload = ("source.png", _png_bytes(image, 256), "image/png")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # retired; kept on purpose
                raw = self._client.images.with_raw_response.create_variation(
                    model="dall-e-2", image=upload, n=1, size="256x256", response_format="b64_json")
        else:
            upload = ("source.png", _png_bytes(image, cfg["upload_size"]), "image/png")
            raw = self._client.images.with_raw_response.edit(
                model=cfg["model"], image=upload, prompt=cfg["prompt"], n=1, size=cfg["size"],
                quality=cfg["quality"], output_format="png")
        return raw.http_response.content

    def _wait_before_retry(self, f: "_Failure", attempt: int) -> float:
        """Seconds to wait before retrying failure ``f``; raises what must not be retried."""
        where = _public_url(str(self._client.base_url))
        if f.kind == "unreachable" and not self.requests_answered:
            raise APIFailure(f"cannot reach the OpenAI API at {where}: {f.message}; check "
                             f"the network and base_url (--base-url)")
        if f.kind == "other":
            raise APIFailure(f"the openai client failed: {f.message}")
        if f.status == 429 and f.code == "insufficient_quota":
            raise APIFailure(f"the account's quota is used up (429 insufficient_quota: "
                             f"{f.message}); add credit, then rerun to resume")
        if f.kind == "status" and f.status != 429 and f.status not in RETRY_STATUS:
            raise self._final_error(f)
        if attempt >= self.cfg["max_attempts"]:
            what = ("still rate limited (429) after" if f.status == 429
                    else f"could not reach {where} in" if f.kind == "unreachable"
                    else f"{f.summary} on all")
            raise APIFailure(f"{what} {attempt} attempts; finished images are kept, rerun "
                             f"later to resume")
        wait = f.retry_after
        if wait is None:  # exponential backoff, capped, with up to 25% added at random so
            # that parallel runs hit by one outage do not retry in lockstep
            base = min(self.cfg["backoff_s"] * 2 ** (attempt - 1), self.cfg["backoff_max_s"])
            return base * (1 + 0.25 * random.random())
        if wait > self.cfg["max_retry_after_s"]:
            raise APIFailure(f"{f.summary}: the API asks to wait {wait:.0f} s (Retry-After), "
                             f"more than max_retry_after_s={self.cfg['max_retry_after_s']}; "
                             f"finished images are kept, rerun later to resume")
        return max(wait, 0.5)  # "0" would retry at once, in a loop against an overloaded API

    def _final_error(self, f: "_Failure") -> Exception:
        """The error to raise for a 4xx answer: a refusal, a retired model, or a failure."""
        code, message, status = f.code, f.message, f.status
        if code in REFUSAL_CODES or "safety system" in message:
            return Refused(f"{code or status}: {message}")
        if status == 404 or code == "model_not_found":
            if self.cfg["route"] == "variation":
                return APIFailure(f"DALL-E 2's image-variation endpoint was retired on {RETIRED} "
                                  f"(the API answered {status} {code}: {message}). Use "
                                  f"route='edit' (--route edit), which calls images.edit "
                                  f"with a GPT Image model")
            return APIFailure(f"model {self.cfg['model']!r} is not available ({status} {code}: "
                              f"{message}); set model= (--model) to a current GPT Image "
                              f"model such as gpt-image-2")
        if status == 401:
            return APIFailure(f"the API rejected the key in OPENAI_API_KEY (401 {code}); "
                              f"check or renew the key")
        return APIFailure(f"the API refused the request ({status} {code}: {message})")


@dataclass(frozen=True)
class _Failure:
    """What the retry logic needs of an API error, redacted, without the error itself."""

    # "timeout", "status", "dropped" (connection lost after the request was sent),
    # "unreachable" (no connection: nothing sent) or "other"
    kind: str
    status: int | None         # HTTP status of a "status" failure
    code: str | None           # the error code in the answer's body
    message: str               # redacted
    retry_after: float | None  # seconds the answer asks to wait (429, 503), if it says

    @classmethod
    def of(cls, err) -> "_Failure":
        import openai

        if isinstance(err, openai.APIStatusError):
            code, message = _error_fields(err)
            return cls("status", err.status_code, code, message,
                       retry_after_seconds(err.response.headers))
        if isinstance(err, openai.APIConnectionError):  # timeouts included
            cause = f" ({type(err.__cause__).__name__})" if err.__cause__ is not None else ""
            if _never_sent(err):
                return cls("unreachable", None, None, _redact(str(err)) + cause, None)
            if isinstance(err, openai.APITimeoutError):
                return cls("timeout", None, None, "the request timed out", None)
            return cls("dropped", None, None, _redact(str(err)) + cause, None)
        return cls("other", None, None, f"{type(err).__name__}: {_redact(str(err))}", None)

    @property
    def summary(self) -> str:
        return f"HTTP {self.status}" if self.status else f"the request ({self.kind})"


# The transport's errors that mean nothing reached the API (no connection, no free one in
# the pool, an unusable URL, a refusing proxy); by name: openai 1.x raises httpx's, 3.x httpx2's.
NEVER_SENT = {"ConnectError", "ConnectTimeout", "PoolTimeout", "UnsupportedProtocol",
              "ProxyError"}


def _never_sent(err) -> bool:
    """True when the openai error's cause says the request never left this machine."""
    return any(c.__name__ in NEVER_SENT for c in type(err.__cause__).__mro__)


class _UrlAnswer(ValueError):
    """An answer that links to its image instead of holding it: paid, and not retried."""


# ----------------------------------------------------------------------------- helpers

def retry_after_seconds(headers) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``."""
    if headers.get("retry-after-ms") is not None:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        # "1e400" is an instruction to wait forever: inf, which stops the run
        return max(0.0, seconds) if not math.isnan(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _png_bytes(image: torch.Tensor, side: int) -> bytes:
    """A uint8 [1,H,W] slice as RGB PNG bytes, upscaled to ``side`` pixels."""
    pil = Image.fromarray(image[0].cpu().numpy(), mode="L").convert("RGB")
    if side != SIZE:
        pil = pil.resize((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _image_from_answer(body: bytes) -> torch.Tensor:
    """uint8 [1,128,128] from a ``b64_json`` answer body; ValueError naming what is wrong."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the body is not valid JSON ({err.msg if hasattr(err, 'msg') else err}; "
                         f"{len(body)} bytes)") from None
    items = data.get("data") if isinstance(data, dict) else None
    if items and isinstance(items[0], dict) and items[0].get("url") and \
            not items[0].get("b64_json"):
        raise _UrlAnswer("the API answered with a URL instead of b64_json image data (this "
                         "model or endpoint does not return images inline); asking again would "
                         "pay again, so the run stops: use a GPT Image model")
    if not items or not isinstance(items[0], dict) or not items[0].get("b64_json"):
        raise ValueError("the JSON has no data[0].b64_json image")
    try:
        png = base64.b64decode(items[0]["b64_json"], validate=True)
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            return to_gray128(img)
    except (binascii.Error, UnidentifiedImageError, OSError) as err:
        raise ValueError(f"data[0].b64_json is not a readable image ({err})") from None


def _error_fields(err) -> tuple[str | None, str]:
    """(error code, redacted message) of an API error answer."""
    body = err.body if isinstance(getattr(err, "body", None), dict) else {}
    inner = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    return inner.get("code"), _redact(str(inner.get("message") or err.message))


_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{3,}|Bearer\s+\S+)")


def _redact(text: str) -> str:
    """``text`` with the API key, and anything shaped like a key, blanked out."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        text = text.replace(key, "***")
    return _KEY_LIKE.sub("***", text)


def _public_url(url: str) -> str:
    """``url`` without user:password, which must not reach a cache key or a log."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
