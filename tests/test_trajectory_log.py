"""The training-trajectory log: segments, bounds, crash safety, schema."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spo_agents.errors import ConfigError, TrajectoryError
from spo_agents.trajectories import LOG_DIR, VISITS, LoggedTrajectory, TrajectoryLog, TrajectoryLogReader, segments_of
from spo_agents.types import ToolCall, Trajectory


class CharTokenizer:
    """One token per character: token id = code point."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()


def math_trajectory(pid: str = "p/1", answer: str = "5", version: int = 0) -> Trajectory:
    """A math-python episode: code, interpreter reply, boxed answer."""
    first, reply = "Let me compute. <code>print(2 + 3)</code>", "\n<interpreter>\n5\n</interpreter>\n"
    last = f"So \\boxed{{{answer}}}."
    ids = TOK.encode(first) + TOK.encode(reply) + TOK.encode(last)
    mask = [1] * len(first) + [0] * len(reply) + [1] * len(last)
    logprobs = [-0.5 if m else 0.0 for m in mask]
    return Trajectory(
        pid,
        "math-python-v0",
        TOK.encode("What is 2 + 3?"),
        ids,
        mask,
        logprobs,
        reward=float(answer == "5"),
        terminated=True,
        policy_version=version,
        turn_starts=[0, len(first) + len(reply)],
        tool_calls=[ToolCall(code="print(2 + 3)", output="5", ok=True, duration_s=0.01)],
        info={"answer": answer, "correct": answer == "5", "check": "number"},
    )


def test_segments_split_model_text_tool_code_and_env_reply():
    t = math_trajectory()
    segs = segments_of(t, TOK)
    assert [(s.kind, s.mask) for s in segs] == [("model", 1), ("env", 0), ("model", 1)]
    assert segs[0].parts == [["text", "Let me compute. <code>"], ["code", "print(2 + 3)"], ["text", "</code>"]]
    assert segs[1].text == "\n<interpreter>\n5\n</interpreter>\n" and segs[1].tool_call == 0
    assert segs[2].parts == [["text", "So \\boxed{5}."]] and segs[2].tool_call is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(1, 6)), min_size=1, max_size=12), st.data())
def test_segments_reassemble_to_the_trajectory_tokens(runs, data):
    mask = [m for m, n in runs for _ in range(n)]
    ids = list(range(100, 100 + len(mask)))
    starts = data.draw(st.lists(st.integers(0, len(mask) - 1), max_size=4))
    t = Trajectory("p", "e", [1], ids, mask, [-1.0 if m else 0.0 for m in mask], 0.0, turn_starts=starts)
    rec = LoggedTrajectory.from_dict(json.loads(json.dumps(_record(t).to_dict())))
    assert rec.token_ids() == ids
    assert rec.loss_mask() == mask
    for s in rec.segments:
        assert s.kind == ("model" if s.mask else "env")
        assert s.text == TOK.decode(s.tokens)
    # a generation start always opens a segment
    offsets = [0]
    for s in rec.segments:
        offsets.append(offsets[-1] + len(s.tokens))
    assert {x for x in starts if x > 0} <= set(offsets)


def _record(t):
    from spo_agents.trajectories import make_record

    return make_record(
        t, step=1, index=0, batch_size=1, advantage=0.0, v_hat_before=0.5, rho=0.9, tokenizer=TOK, logprobs=True
    )


def test_logprobs_and_token_pieces_are_kept_when_asked(tmp_path):
    with TrajectoryLog(tmp_path, save_logprobs=True) as log:
        log.record(1, [math_trajectory()], [1.0], [0.25], [0.96], TOK)
    rec = TrajectoryLogReader(tmp_path).get(1, 0)
    model = [s for s in rec.segments if s.kind == "model"]
    assert all(len(s.logprobs) == len(s.tokens) == len(s.pieces) for s in model)
    assert "".join(model[0].pieces) == model[0].text
    assert (rec.v_hat_before, rec.rho, rec.advantage, rec.answer) == (0.25, 0.96, 1.0, "5")
    assert rec.prompt_text == "What is 2 + 3?" and rec.tool_calls[0]["output"] == "5"


def _key(seed: int, step: int, index: int) -> float:
    """The documented sample key: blake2b (8 bytes, little endian) of `seed:step:index` over 2^64."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _on_disk(run_dir) -> set[tuple[int, int]]:
    reader = TrajectoryLogReader(run_dir)
    return {(r.step, r.index) for r in reader.iter_all()}


def test_bounds_hold_over_many_steps(tmp_path):
    n, last, p, cap, batch, seed = 3, 60, 0.5, 10, 8, 7
    batch_trajs = [math_trajectory(f"p/{i}") for i in range(batch)]
    with TrajectoryLog(tmp_path, keep_last_steps=n, older_sample=p, older_max=cap, seed=seed) as log:
        for step in range(1, last + 1):
            log.record(step, batch_trajs, [0.0] * batch, [0.5] * batch, [0.9] * batch, tokenizer=TOK)
            got = _on_disk(tmp_path)
            recent = {(s, i) for s in range(max(1, step - n + 1), step + 1) for i in range(batch)}
            # older steps: the `cap` smallest keys among those under `p`
            candidates = sorted((_key(seed, s, i), s, i) for s in range(1, step - n + 1) for i in range(batch))
            want_older = {(s, i) for u, s, i in candidates if u < p}
            want_older = {(s, i) for _, s, i in [c for c in candidates if (c[1], c[2]) in want_older][:cap]}
            assert got == recent | want_older, f"step {step}"
            assert len(got) <= n * batch + cap
    files = list((tmp_path / LOG_DIR).glob("step-*.jsonl.gz"))
    assert len(files) <= n + cap
    visits = TrajectoryLogReader(tmp_path).visits()
    assert [(v.step, v.index) for v in visits] == [(s, i) for s in range(1, last + 1) for i in range(batch)]


def test_no_older_sample_keeps_only_the_window(tmp_path):
    with TrajectoryLog(tmp_path, keep_last_steps=2, older_sample=0.0) as log:
        for step in range(1, 6):
            log.record(step, [math_trajectory()], [0.0], [0.5], [0.9], TOK)
    assert TrajectoryLogReader(tmp_path).steps() == [4, 5]


def test_resume_after_a_crash_loses_nothing_before_it(tmp_path):
    trajs = [math_trajectory("a"), math_trajectory("b", answer="6")]
    early = TrajectoryLogReader(tmp_path)  # a viewer that reads along while the run writes
    with TrajectoryLog(tmp_path, keep_last_steps=4, older_sample=0.0) as log:
        for step in range(1, 7):
            log.record(step, trajs, [1.0, -1.0], [0.5, 0.5], [0.9, 0.9], TOK)
            assert [v.step for v in early.visits()] == [s for s in range(1, step + 1) for _ in "ab"]
    # the crash: step 6 was logged but its checkpoint never written, and a visit row was torn
    with open(tmp_path / LOG_DIR / VISITS, "a", encoding="utf-8") as f:
        f.write('[7, 0, "a", 1.0, tr')
    (tmp_path / LOG_DIR / ".step-000007.jsonl.gz.tmp").write_bytes(b"\x1f\x8b partial")
    with TrajectoryLog(tmp_path, keep_last_steps=4, older_sample=0.0, start_step=5) as log:
        assert TrajectoryLogReader(tmp_path).steps() == [3, 4, 5]
        log.record(6, trajs, [1.0, -1.0], [0.5, 0.5], [0.9, 0.9], TOK)
        log.record(7, trajs, [1.0, -1.0], [0.5, 0.5], [0.9, 0.9], TOK)
    reader = TrajectoryLogReader(tmp_path)
    visits = reader.visits()
    assert [(v.step, v.problem_id) for v in visits] == [(s, p) for s in range(1, 8) for p in "ab"]
    assert early.visits() == visits  # the reader that read along follows the rewrite at resume
    assert [v.correct for v in reader.visits("b")] == [False] * 7
    assert reader.steps() == [4, 5, 6, 7]
    assert not list((tmp_path / LOG_DIR).glob(".step-*"))


def test_bad_calls_and_newer_schemas_are_refused(tmp_path):
    with TrajectoryLog(tmp_path) as log:
        with pytest.raises(ConfigError, match="one value per trajectory"):
            log.record(1, [math_trajectory()], [0.0, 1.0], [0.5], [0.9], TOK)
        log.record(2, [math_trajectory()], [0.0], [0.5], [0.9], TOK)
        with pytest.raises(ConfigError, match="steps must increase"):
            log.record(2, [math_trajectory()], [0.0], [0.5], [0.9], TOK)
    path = tmp_path / LOG_DIR / "step-000002.jsonl.gz"
    rec = json.loads(gzip.decompress(path.read_bytes()))
    rec["schema_version"] = 99
    path.write_bytes(gzip.compress((json.dumps(rec) + "\n").encode()))
    with pytest.raises(TrajectoryError, match="newer"):
        TrajectoryLogReader(tmp_path).read_step(2)
    with pytest.raises(ConfigError, match="keep_last_steps"):
        TrajectoryLog(tmp_path, keep_last_steps=0)


def test_problem_ids_are_kept_for_readers(tmp_path):
    TrajectoryLog(tmp_path, problem_ids=["x/1", "x/2"]).close()
    assert TrajectoryLogReader(tmp_path).problem_ids() == ["x/1", "x/2"]
