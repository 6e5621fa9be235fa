"""Reading failures of an OpenAI-compatible server: what a connection error was, the server's own
words in an error reply, and how long a `Retry-After` asks to wait."""

from __future__ import annotations

import email.utils
import json
from datetime import datetime, timezone
from typing import Any


def causes(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from, outermost first (bounded: no cycles)."""
    chain: list[BaseException] = []
    while e is not None and len(chain) < 8 and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return chain


def connection_failure(e: BaseException) -> str:
    """`refused` (no connection made: nothing listens, unreachable, connect timed out), `timeout`
    (connected, no answer in time) or `dropped` (the connection broke mid-request or mid-reply)."""
    names = {type(c).__name__ for c in causes(e)}
    if names & {"ConnectError", "ConnectTimeout", "ConnectionRefusedError"}:
        return "refused"
    if names & {"ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException"}:
        return "timeout"
    return "dropped"


def cause_text(e: BaseException) -> str:
    """The innermost non-empty message of `e`'s chain, e.g. `All connection attempts failed`."""
    for c in reversed(causes(e)):
        if str(c):
            return f"{type(c).__name__}: {c}"
    return type(e).__name__


def server_message(e: Any) -> str:
    """The server's own words in an error reply: OpenAI's `error.message`, FastAPI's `detail`, or
    the body's first 300 characters."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        for key in ("message", "detail"):
            if isinstance(inner, dict) and isinstance(inner.get(key), str):
                return inner[key]
        if isinstance(body.get("detail"), str):
            return body["detail"]
        return json.dumps(body)[:300]
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return getattr(e, "message", None) or type(e).__name__


def mentions_model(message: str, model: str) -> bool:
    """Whether a refusal speaks of the model (then it is about `--model`, not about the URL)."""
    return model in message or "model" in message.lower()


def retry_after(response: Any, cap: float) -> float | None:
    """Seconds to wait from a reply's `retry-after-ms` or `Retry-After` (seconds or an HTTP
    date), at most `cap`; None when absent or unreadable."""
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms") is not None:
            return min(max(float(headers["retry-after-ms"]) / 1000.0, 0.0), cap)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        return min(max(seconds, 0.0), cap)
    except (TypeError, ValueError):
        return None
