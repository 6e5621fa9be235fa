"""What the learner trained on: a bounded log of training trajectories, and a per-visit log.

The writer is in `spo_agents.trajectories.writer` (`TrajectoryLog`), the records in
`spo_agents.trajectories.records`, the file helpers in `spo_agents.trajectories.files`, the reader
in `spo_agents.trajectories.reader` (`TrajectoryLogReader`); every public name is importable from
here. The training loop calls `TrajectoryLog.record(...)` once per step with the trajectories the
learner trained on. `RUN_DIR/trajectories/` holds a per-visit log (`visits.jsonl`, every step,
never thinned) and one gzip'ed JSONL file per step: every trajectory of the last
`keep_last_steps` steps, and a seeded sample of older ones.

The file layout, the record format, the sampling bounds and the crash safety: docs/viewer.md,
section "The training-trajectory log".
"""

from spo_agents.trajectories.files import sample_key, step_file
from spo_agents.trajectories.reader import TrajectoryLogReader
from spo_agents.trajectories.records import (
    LOG_DIR,
    META,
    PROBLEMS,
    SCHEMA_VERSION,
    VISIT_COLUMNS,
    VISITS,
    LoggedTrajectory,
    Segment,
    Visit,
    make_record,
    segments_of,
)
from spo_agents.trajectories.writer import TrajectoryLog

__all__ = [
    "LOG_DIR",
    "META",
    "PROBLEMS",
    "SCHEMA_VERSION",
    "VISITS",
    "VISIT_COLUMNS",
    "LoggedTrajectory",
    "Segment",
    "TrajectoryLog",
    "TrajectoryLogReader",
    "Visit",
    "make_record",
    "sample_key",
    "segments_of",
    "step_file",
]
