"""The weight label of a vLLM server: which version of the learner's weights it serves.

Both sides of the protocol live here: a weight push writes the label (`serving.weight_sync`),
and the multi-server policy reads it before sending a server requests of a new version
(`rollout.policy.multi`). vLLM keeps the label as a string; its routes exist only with
`VLLM_SERVER_DEV_MODE=1`, and a server without them is not checked.
"""

from __future__ import annotations

from typing import Any

#: Set the label (POST, body from `label_body`).
SET_ROUTE = "/update_weight_version"
#: Read it (GET, answer read by `label_of`).
GET_ROUTE = "/weight_info"
#: Liveness.
HEALTH_ROUTE = "/health"
#: The label of a server that has had no push: it serves the weights it started with (version 0).
INITIAL_LABELS = ("default", "0")


def label_body(version: int) -> dict[str, str]:
    """The body of a `SET_ROUTE` request labelling the server with `version`."""
    return {"new_version": str(int(version))}


def label_of(answer: Any) -> str | None:
    """The label in a `GET_ROUTE` answer (decoded JSON); None when it holds none.
    Raises `ValueError` when the answer is not the JSON object vLLM sends."""
    if not isinstance(answer, dict):
        raise ValueError(f"expected a JSON object with `weight_version`, got {answer!r}")
    label = answer.get("weight_version")
    return None if label is None else str(label)


def serves(label: str | None, version: int) -> bool:
    """Whether a server labelled `label` serves `version` (no label: nothing to check)."""
    if label is None:
        return True
    return label == str(version) or (version == 0 and label in INITIAL_LABELS)
