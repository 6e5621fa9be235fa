"""A reachable vLLM server: synchronous HTTP access to its root routes (health, weight sync, pause)
and its OpenAI routes. `connect(base_url)` waits for a server someone else runs."""

from __future__ import annotations

import time
from typing import Any

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.weight_labels import GET_ROUTE, HEALTH_ROUTE, SET_ROUTE


def root_url(base_url: str) -> str:
    """`http://host:port/v1` or `http://host:port/` -> `http://host:port` (the server root,
    where `/health`, `/pause` and friends live; the OpenAI routes are under `/v1`)."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"a server URL must start with `http://` or `https://`, got `{base_url}`")
    return url


def base_urls(values: str | list[str] | None) -> list[str]:
    """`--base-url` values, each one URL or several separated by commas, as one list of URLs."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    return [u.strip() for item in items for u in item.split(",") if u.strip()]


class VLLMEndpoint:
    """A reachable vLLM server: thin synchronous HTTP access to its root and OpenAI routes.

    Weight synchronisation and health checks go through here; generation goes through the
    `openai` policy backend with `openai_base_url`.
    """

    def __init__(self, base_url: str, *, timeout_s: float = 600.0, model: str | None = None) -> None:
        self.base_url = root_url(base_url)
        self.timeout_s = timeout_s
        self._model = model
        self._client: Any = None

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def client(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.Client(base_url=self.base_url, timeout=self.timeout_s)
        return self._client

    def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None, ok_404: bool = False
    ) -> Any:
        """Send one request; return the decoded JSON body (or None for an empty body).

        A 404 returns None when `ok_404` (feature probes); any other non-2xx status raises
        `PolicyError` with the server's answer.
        """
        import httpx

        try:
            resp = self.client.request(method, path, json=json, params=params)
        except httpx.HTTPError as e:
            raise PolicyError(
                f"vLLM server at `{self.base_url}` did not answer `{method} {path}`: {e!r}. "
                "Check that it is running (see its log) and reachable from here."
            ) from e
        if resp.status_code == 404 and ok_404:
            return None
        if resp.status_code >= 400:
            hint = ""
            if resp.status_code == 404 and path in DEV_ENDPOINTS:
                hint = " Start the server with `VLLM_SERVER_DEV_MODE=1` to expose it."
            raise PolicyError(
                f"vLLM server at `{self.base_url}` answered `{method} {path}` with HTTP "
                f"{resp.status_code}: {resp.text[:500]}.{hint}"
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def healthy(self) -> bool:
        """True when `/health` answers 200 (never raises)."""
        import httpx

        try:
            return self.client.get(HEALTH_ROUTE, timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float, *, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() >= deadline:
                raise PolicyError(
                    f"vLLM server at `{self.base_url}` was not healthy (`GET /health`) within "
                    f"{timeout_s:.0f} s. Start it first, or pass the right `--base-url`."
                )
            time.sleep(poll_s)

    @property
    def model(self) -> str:
        """The served model name (the first entry of `/v1/models`, i.e. the base model)."""
        if self._model is None:
            data = self.get("/v1/models")
            try:
                self._model = str(data["data"][0]["id"])
            except (KeyError, IndexError, TypeError) as e:
                raise PolicyError(f"`GET /v1/models` at `{self.base_url}` returned no model: {data!r}") from e
        return self._model

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


#: Routes that exist only with `VLLM_SERVER_DEV_MODE=1`.
DEV_ENDPOINTS = (
    "/collective_rpc",
    "/reset_prefix_cache",
    "/pause",
    "/resume",
    "/is_paused",
    SET_ROUTE,
    GET_ROUTE,
)


def connect(base_url: str, *, timeout_s: float = 30.0, request_timeout_s: float = 600.0) -> VLLMEndpoint:
    """An endpoint for a server someone else runs; waits up to `timeout_s` for `/health`."""
    endpoint = VLLMEndpoint(base_url, timeout_s=request_timeout_s)
    endpoint.wait_healthy(timeout_s)
    return endpoint
