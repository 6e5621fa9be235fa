"""Peak memory of one learner update on the embedded 135M model, by `train.micro_batch_tokens`.

A batch shaped like the CPU default's (16 trajectories, 150 prompt + 160 response tokens, random
token ids, alternating advantages), one `Learner.update`, peak resident memory of the process
(`ru_maxrss`, which includes loading the model). Run one size per process:

    .venv/bin/python bench/learner_memory.py 4096
    .venv/bin/python bench/learner_memory.py 1024
"""

import random
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from spo_agents.config import Config, from_dict
from spo_agents.models import embedded_model_dir
from spo_agents.training.learner import Learner, LearnerSettings
from spo_agents.types import Trajectory

mbt = int(sys.argv[1])
torch.manual_seed(0)
random.seed(0)
d = embedded_model_dir()
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
cfg = from_dict(Config, {"train": {"micro_batch_tokens": mbt}})
learner = Learner(model, LearnerSettings.from_config(cfg), pad_id=2)
trajs = []
for i in range(16):
    n = 160
    trajs.append(
        Trajectory(
            f"p{i}",
            "x",
            [random.randrange(1000, 40000) for _ in range(150)],
            [random.randrange(1000, 40000) for _ in range(n)],
            [1] * n,
            [-2.0] * n,
            float(i % 2),
        )
    )
adv = [1.0 if i % 2 else -1.0 for i in range(16)]
t = time.time()
learner.update(trajs, adv)
update_s = time.time() - t
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(f"micro_batch_tokens={mbt}: peak RSS {peak_gb:.2f} GB, update {update_s:.1f} s")
