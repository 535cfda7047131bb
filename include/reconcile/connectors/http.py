"""HTTP plumbing shared by the API connectors (hubspot/, dynamics/): one httpx client per connector, bearer
token, retries with tenacity.

Retried: 429 (waiting what `Retry-After` or the vendor's rate-limit headers say, capped), 5xx and network
errors (exponential back-off with jitter). Every other status is returned to the caller, which knows what a
409 or a 412 means for its API. The token is never part of a message: errors name the system and the base
URL, and any text that could echo the token is masked.
"""
from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from datetime import datetime, timezone

import httpx
import tenacity

from ..errors import SystemUnreachable


class _Retry(Exception):
    def __init__(self, response: httpx.Response | None, wait: float | None, why: str):
        super().__init__(why)
        self.response = response
        self.wait = wait


class ApiClient:
    """Requests against one API's base URL, retried as the module docstring says."""

    def __init__(self, system: str, url: str, *, max_retries: int, max_wait: float, timeout: float,
                 rate_wait: Callable[[httpx.Response], float | None] | None = None,
                 headers: dict[str, str] | None = None):
        self.system = system
        parsed = httpx.URL(url)
        self._token = parsed.password or ""
        self.base_url = str(parsed.copy_with(username=None, password=None)).rstrip("/")
        if not self._token:
            raise SystemUnreachable(f"system {system!r} ({self.base_url}): no API token (set token_env or the "
                                    "connection's password)")
        self.max_retries = max_retries
        self.max_wait = max_wait
        self._rate_wait = rate_wait
        self.retries = 0  # how many calls were retried (reported by tests and progress lines)
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                                          **(headers or {})})

    def mask(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def message(self, resp: httpx.Response) -> str:
        """The API's own message for a failed call, token masked: what a per-record outcome carries."""
        return self.mask(error_message(resp))[:500]

    def fail(self, what: str, detail: str) -> SystemUnreachable:
        return SystemUnreachable(self.mask(f"system {self.system!r} ({self.base_url}): {what}: {detail}"))

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        """The response of the first attempt that is neither a 429, a 5xx nor a network error."""
        backoff = tenacity.wait_exponential_jitter(initial=0.2, max=self.max_wait, jitter=0.5)

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Retry) and exc.wait is not None:
                return min(exc.wait, self.max_wait)
            return backoff(state)

        def attempt() -> httpx.Response:
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                raise _Retry(None, None, f"{type(e).__name__}: {e}") from None
            if resp.status_code == 429 or resp.status_code >= 500:
                hint = _retry_after(resp)
                if hint is None and resp.status_code == 429 and self._rate_wait:
                    hint = self._rate_wait(resp)
                raise _Retry(resp, hint, f"HTTP {resp.status_code} {resp.text[:200]}")
            return resp

        def count(_state) -> None:
            self.retries += 1

        try:
            return tenacity.Retrying(stop=tenacity.stop_after_attempt(self.max_retries + 1), wait=wait,
                                     retry=tenacity.retry_if_exception_type(_Retry), before_sleep=count,
                                     sleep=time.sleep, reraise=True)(attempt)
        except _Retry as e:
            raise self.fail(f"{method} {path} failed after {self.max_retries + 1} attempts", str(e)) from None

    def json(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw):
        """The decoded body of a call that must succeed (any status not in `ok` is an error naming it)."""
        resp = self.request(method, path, **kw)
        if resp.status_code not in ok:
            raise self.fail(f"{method} {path} returned HTTP {resp.status_code}", error_message(resp))
        return resp.json() if resp.content else None

    def close(self) -> None:
        self.http.close()


def error_message(resp: httpx.Response) -> str:
    """The API's own message for a failed call (JSON `message` / `error.message`), else the body's start."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return str(body)[:300]


def _retry_after(resp: httpx.Response) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date), None when absent or unreadable."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
