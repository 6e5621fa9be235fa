"""What the learner trained on: a bounded log of training trajectories, and a per-visit log.

This module holds the writer (`TrajectoryLog`); the records are in `spo_agents.trajectories.records`,
the file helpers in `spo_agents.trajectories.files`, the reader in `spo_agents.trajectories.reader`,
and every public name is importable from here.


The training loop calls `TrajectoryLog.record(...)` once per step, after the advantages and the
tracker's rho of the batch are known, with the trajectories the learner trained on. Two logs live
in `RUN_DIR/trajectories/`:

    meta.json               schema version and the writer's settings
    problems.json.gz        the training problem ids in tracker order (optional; lets readers name
                            problems the tracker holds only as hashes)
    visits.jsonl            one compact row per trained trajectory, every step, never thinned
    step-000012.jsonl.gz    the trajectories of step 12: all of them for the last
                            `keep_last_steps` steps, a seeded sample for older steps

**Visits** (`visits.jsonl`): a header line `{"schema_version": 1, "columns": [...]}`, then one
JSON array per trajectory: `[step, index, problem_id, reward, correct, v_hat_before, rho,
advantage, policy_version]` (`index` is the trajectory's position in the step's batch). About 70
bytes a row; appended and flushed every step, so a problem's whole history survives the sampling
of the full records.

**Step files** hold one `LoggedTrajectory` per line (JSON, gzip). A record keeps what the learner
trained on: the ids, the step and policy version, v_hat before the update, the advantage, rho,
the reward and answer, and the text split into `Segment`s: runs of tokens the policy sampled
(`model`, loss mask 1) and runs the environment inserted (`env`, loss mask 0), each with its
tokens and decoded text. Model segments are further split into `text` and `code` parts where a
tool call's code appears; env segments that answer a tool call name it. Per-token log-probs
(rounded to 6 significant digits, float32's precision) and the text of each token are kept when
`save_logprobs=True`. The segments' tokens and masks, concatenated, are exactly the trajectory's
`token_ids` and `loss_mask`.

**Bounds.** Every trajectory of the last `keep_last_steps` steps is kept. When a step leaves
that window its file is thinned to a seeded sample: each trajectory gets a key
u = blake2b(seed, step, index) in [0, 1); it is kept while u < `older_sample` and u is among the
`older_max` smallest keys of all older trajectories (a bottom-k sample: uniform over older steps,
reproducible, and the same set whatever order steps arrive in). So at most
`keep_last_steps * batch_size + older_max` trajectories are on disk. Older files are rewritten
(thinned again) as the sample's threshold falls.

**Crash safety.** Step files are written to a temporary file and renamed into place. Visits are
appended a whole line at a time; a torn last line (a crash mid-write) is dropped when the log is
opened again. `TrajectoryLog(..., start_step=S)` (the step a resumed run restarts from) also
drops visits and step files of steps after S, which the resumed run will redo, so nothing before
the crash is lost and nothing is counted twice.

Readers (`TrajectoryLogReader`, the viewer) tolerate a log that is being written.
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
