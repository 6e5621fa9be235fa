"""Config sections of the rollout side: the sandbox, the rollout (policy servers, collection) and Ray workers.

Re-exported by `spo_agents.config`, where the full `Config` lives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from spo_agents.config.rules import AT_LEAST_1, INT_NON_NEGATIVE, NON_NEGATIVE, POSITIVE, finite, require
from spo_agents.errors import ConfigError


@dataclass
class SandboxConfig:
    """The code-execution backend used by tool environments."""

    backend: str = "local"
    timeout_s: float = 10.0  # wall clock per tool call
    memory_mb: int = 1024
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific

    def __post_init__(self) -> None:
        require("sandbox", self, {"timeout_s": POSITIVE, "memory_mb": AT_LEAST_1})


@dataclass
class RolloutConfig:
    """How trajectories are generated.

    `backend`: `hf` (transformers in-process, CPU default), `vllm` (in-process engine on a GPU),
    `vllm-server` (a vLLM OpenAI-compatible server, token-in/out, weights synced with
    `weight_sync`), `openai` (any OpenAI-compatible server: evaluation and offline value
    estimation only, since the trainer cannot update its weights).
    Single-stream collection keeps `max_in_flight` episodes running and hands the learner the
    first `train.batch_size` that finish; `oversample` > 1 starts that many times more episodes
    than needed (paper Sec. 5.4). Trajectories generated more than `max_staleness` policy
    versions ago are dropped.
    """

    backend: Literal["hf", "vllm", "openai", "vllm-server"] = "hf"
    max_in_flight: int = 16
    oversample: float = 1.0
    max_staleness: int = 1
    temperature: float = 1.0  # paper: 1.0 for training and for offline value estimation
    # Training samples from the full distribution: the learner's ratio compares the behaviour
    # log-probs with the full softmax, so a nucleus (top-p < 1) or top-k would bias every ratio
    # (at top-p 0.5 an on-policy ratio is about 0.5). Both are refused here; `eval.*` keeps them.
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48  # per generation call (one turn); the CPU default's turns need ~20
    max_episode_tokens: int = 160  # all tokens after the prompt, env replies included
    # one endpoint or a list (requests go to the least-loaded; an episode stays on one server)
    base_url: str | list[str] | None = None
    servers: int = 1  # vLLM servers to start when `backend: vllm-server` has no `base_url`
    server_kv_cache_gib: float | None = None  # KV cache of each started server (null: 1 GiB for servers > 1)
    workers: Literal["local", "ray"] = "local"  # where episodes run: this process, or Ray actors (`ray.*`)
    api_key_env: str = "OPENAI_API_KEY"
    server_model: str | None = None  # model name to send to the server (default: model.name)
    weight_sync: Literal["reload", "lora", "nccl"] = "reload"
    server_python: str | None = None  # interpreter of the vLLM server venv when we start it
    server_args: list[str] = field(default_factory=list)
    request_timeout_s: float = 600.0  # server backends: the wait for the next byte of an answer
    max_retries: int = 5  # server backends: retries of a request after 429 / 5xx / a dropped connection
    server_wait_s: float = 300.0  # server backends: how long a server that went down is waited for
    # A step that loses more than this share of its finished episodes to infrastructure errors
    # is reported at once; `max_error_steps` such steps in a row stop the run.
    max_error_share: float = 0.25
    max_error_steps: int = 3

    def __post_init__(self) -> None:
        require(
            "rollout",
            self,
            {
                "max_error_share": (lambda x: finite(x) and 0 <= x < 1, "in [0, 1)"),
                "max_error_steps": AT_LEAST_1,
                "max_retries": INT_NON_NEGATIVE,
                "server_wait_s": NON_NEGATIVE,
                "max_in_flight": AT_LEAST_1,
                "servers": AT_LEAST_1,
                "server_kv_cache_gib": (lambda x: x is None or (finite(x) and x > 0), "a number of GiB > 0, or null"),
                "base_url": (
                    lambda x: x is None or (isinstance(x, str) and bool(x)) or (bool(x) and all(u for u in x)),
                    "a URL such as `http://127.0.0.1:8000/v1`, a non-empty list of them, or null",
                ),
                "oversample": (lambda x: finite(x) and x >= 1, "a finite number >= 1"),
                "max_staleness": INT_NON_NEGATIVE,
                "temperature": POSITIVE,
                "top_p": (
                    lambda x: x == 1.0,
                    "1.0: the learner scores the full softmax, so a nucleus biases every ratio; "
                    "use `eval.top_p` for evaluation",
                ),
                "top_k": (
                    lambda x: x == 0,
                    "0: the learner scores the full softmax, so top-k biases every ratio; "
                    "use `eval.top_k` for evaluation",
                ),
                "max_new_tokens": AT_LEAST_1,
                "max_episode_tokens": AT_LEAST_1,
                "request_timeout_s": POSITIVE,
            },
        )
        self._check_servers()

    def _check_servers(self) -> None:
        if self.servers > 1 and (self.backend != "vllm-server" or self.base_url):
            raise ConfigError(
                f"`rollout.servers: {self.servers}` starts that many vLLM servers, which needs "
                "`rollout.backend: vllm-server` and no `rollout.base_url` (to use running servers, list them "
                "in `rollout.base_url`)"
            )
        if isinstance(self.base_url, list) and self.backend not in ("vllm-server", "openai"):
            raise ConfigError(
                f"a list of `rollout.base_url` needs a server backend (`vllm-server` or `openai`), got `{self.backend}`"
            )
        if self.workers == "ray" and self.backend not in ("vllm-server", "openai"):
            raise ConfigError(
                f"`rollout.workers: ray` runs episodes in Ray actors, which reach the policy through a server; "
                f"`rollout.backend: {self.backend}` lives in the learner's process: use `vllm-server`"
            )

    def endpoints(self) -> list[str]:
        """`base_url` as a list (empty when unset)."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


@dataclass
class RayConfig:
    """Rollout workers on Ray (`rollout.workers: ray`): each actor runs environments, their sandbox
    and a policy client; the learner stays in this process."""

    address: str | None = None  # a running cluster (`ray start --head` prints it); null: start a local one
    num_workers: int = 2  # rollout actors
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per actor

    def __post_init__(self) -> None:
        require("ray", self, {"num_workers": AT_LEAST_1, "cpus_per_worker": POSITIVE})
