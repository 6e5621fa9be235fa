"""The trajectory log under its first name: the format, the writer (`TrajectoryLog`) and the reader
(`TrajectoryLogReader`) are in `spo_agents.trajectories`."""

from __future__ import annotations

from spo_agents.trajectories import (
    LOG_DIR,
    META,
    PROBLEMS,
    SCHEMA_VERSION,
    VISIT_COLUMNS,
    VISITS,
    LoggedTrajectory,
    Segment,
    TrajectoryLog,
    TrajectoryLogReader,
    Visit,
    make_record,
    sample_key,
    segments_of,
    step_file,
)

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
