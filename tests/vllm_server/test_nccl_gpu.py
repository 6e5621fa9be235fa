"""`nccl` weight sync for real: TRL's `VLLMClient` over vLLM's NCCL weight-transfer engine.

Needs a CUDA GPU with `vllm` (CUDA build) and `trl` installed next to the learner:
`.venv/bin/python -m pytest -m gpu tests/vllm_server/test_nccl_gpu.py -q`. Skipped (with the
reason) anywhere else; the call order is unit-tested with a fake client in
tests/test_weight_sync.py.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from spo_agents.serving.vllm_server import VLLMServer, default_python
from spo_agents.serving.weight_sync import NcclSync, check_sync

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
torch = pytest.importorskip("torch")


def test_nccl_sync_reaches_the_server(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the NCCL weight transfer needs one")
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("vllm") is None:
        pytest.skip("`trl` and `vllm` must be installed next to the learner for `VLLMClient`")
    from transformers import AutoModelForCausalLM

    from spo_agents.models import embedded_model_dir

    model_dir = embedded_model_dir()
    learner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda").eval()
    probe = list(range(1000, 1064))
    server = VLLMServer(
        model_dir,
        python=default_python(),
        dtype="float32",
        gpu_memory_utilization=0.3,
        extra_args=["--weight-transfer-config", json.dumps({"backend": "nccl"})],
        log_dir=tmp_path,
        startup_timeout_s=600,
    )
    with server:
        sync = NcclSync(server, device="cuda:0")
        try:
            with torch.no_grad():
                for p in learner.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            with pytest.raises(Exception, match="differ"):
                check_sync(learner, server, probe, atol=1e-3)
            stats = sync.sync(learner, 1)
            print(f"\nnccl sync: {stats}")
            check_sync(learner, server, probe, atol=1e-3)
        finally:
            sync.close()
