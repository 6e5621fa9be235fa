"""The weight-label protocol: what a push writes is what the multi-server policy reads back."""

from __future__ import annotations

import pytest

from spo_agents.weight_labels import label_body, label_of, serves


def _server_answer(body: dict) -> dict:
    """vLLM stores the pushed `new_version` string and reports it as `weight_version`."""
    return {"weight_version": body["new_version"]}


def test_a_pushed_version_reads_back_as_that_version_only():
    label = label_of(_server_answer(label_body(3)))
    assert label == "3"
    assert serves(label, 3)
    assert not serves(label, 4)
    assert not serves(label, 0)


@pytest.mark.parametrize("label", ["default", "0"])
def test_a_server_never_pushed_to_serves_version_0_only(label):
    assert serves(label, 0)
    assert not serves(label, 1)


def test_no_label_is_nothing_to_check_and_a_malformed_answer_is_refused():
    assert label_of({}) is None
    assert serves(None, 7)
    with pytest.raises(ValueError, match="weight_version"):
        label_of(["3"])
