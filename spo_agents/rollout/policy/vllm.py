"""`vllm`: the in-process vLLM engine, for GPUs. `vllm` is imported only when this backend is built.

Requests go to vLLM's async engine as token-id prompts; each returns the sampled token ids and
the log-prob of each sampled token. The engine is created with
`logprobs_mode="processed_logprobs"` where the installed vLLM supports it, so log-probs are
those of the distribution actually sampled from (after temperature / top-k / top-p), matching
the `hf` backend; older vLLM versions return raw log-probs and the backend logs that.
Stop strings: vLLM keeps the tokens of the matched stop string in `token_ids`
(`include_stop_str_in_output` affects only the text).

Weights: `load_weights(named_tensors)` pushes updated tensors into the engine's model in place
(colocated learner; `spo_agents.serving.weight_sync.InProcessVLLMSync`), between `pause()` and
`resume(version)`; the prefix cache is reset afterwards so no KV blocks computed with the old
weights are reused.

Not covered by the default tests (vLLM needs a CUDA GPU; `gpu`-marked tests exercise it).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from spo_agents.errors import ConfigError, PolicyError
from spo_agents.rollout.policy.base import Generation, PolicyBackend, SamplingParams

log = logging.getLogger(__name__)


class VLLMPolicy(PolicyBackend):
    """vLLM's `AsyncLLM` engine in this process.

    Args:
        model: a directory or model name vLLM can load.
        dtype: `bfloat16` (default), `float16` or `float32`.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (leave room for the learner).
        engine_kwargs: further `AsyncEngineArgs` fields.
    """

    def __init__(
        self, model: str, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5, **engine_kwargs: Any
    ) -> None:
        super().__init__()
        try:
            import vllm  # noqa: F401
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as e:
            raise ConfigError(
                "the `vllm` backend needs vLLM on a CUDA machine: `pip install 'spo-agents[vllm]'`; "
                "on CPU use `--backend hf` or an OpenAI-compatible server (`--base-url`)"
            ) from e
        import dataclasses

        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        kwargs: dict[str, Any] = {"model": model, "dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization}
        if "logprobs_mode" in fields:
            kwargs["logprobs_mode"] = "processed_logprobs"
        else:
            log.warning("this vLLM cannot return processed log-probs; log-probs are before temperature/top-k/top-p")
        kwargs.update(engine_kwargs)
        args = AsyncEngineArgs(**kwargs)
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            self.engine = AsyncLLM.from_engine_args(args)
        except ImportError:
            from vllm import AsyncLLMEngine

            self.engine = AsyncLLMEngine.from_engine_args(args)
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        sp = VSampling(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,
            seed=params.seed,
        )
        async with self._gate.request() as version:  # held while new weights load
            final = None
            try:
                async for out in self.engine.generate(
                    TokensPrompt(prompt_token_ids=list(prompt_ids)), sp, f"spo-{next(self._ids)}"
                ):
                    final = out
            except Exception as e:  # noqa: BLE001 - the engine raises many types
                raise PolicyError(f"vLLM generation failed: {type(e).__name__}: {e}") from e
        if final is None:
            raise PolicyError("vLLM returned no output for a request")
        c = final.outputs[0]
        if c.finish_reason not in ("stop", "length"):
            raise PolicyError(
                f"vLLM ended a generation with finish_reason `{c.finish_reason}` (aborted or failed); "
                "its partial turn is not trained on"
            )
        ids = list(c.token_ids)
        lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [])]
        if c.finish_reason == "length":
            reason, stop = "length", None
        elif isinstance(c.stop_reason, str):
            reason, stop = "stop", c.stop_reason
        else:
            reason, stop = "eos", None
        return Generation(ids, lps, c.text, reason, stop, policy_version=version, info={"token_io": True})

    async def load_weights(self, named_tensors: list[tuple[str, Any]]) -> None:
        """Copy updated weights into the engine's model and reset its prefix cache."""

        def _load(worker: Any) -> None:
            worker.model_runner.model.load_weights(weights=named_tensors)

        await self.engine.collective_rpc(_load)
        await self.engine.reset_prefix_cache()

    async def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
