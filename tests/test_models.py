"""Model resolution: the tiny test model and the embedded SmolLM2 copy, both built offline."""

import hashlib
from pathlib import Path

import pytest

from spo_agents import models


def _digest(d: Path) -> str:
    return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPO_AGENTS_CACHE", str(tmp_path))
    a = models.tiny_model_dir(hidden_size=32, num_layers=1, seed=7)
    assert a.parent == tmp_path / "models"
    first = _digest(a)
    import shutil

    shutil.rmtree(a)
    b = models.tiny_model_dir(hidden_size=32, num_layers=1, seed=7)
    assert _digest(b) == first
    assert not [p for p in (tmp_path / "models").iterdir() if p.name != a.name]  # no temp dirs left


def test_tiny_model_has_chat_template_and_end_of_turn():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.tiny_model_dir())
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id


def test_other_names_pass_through():
    assert models.resolve_model("/some/dir") == "/some/dir"
    assert models.resolve_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


@pytest.mark.slow
def test_embedded_model_converts_and_answers(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("SPO_AGENTS_CACHE", str(tmp_path))
    d = models.embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
