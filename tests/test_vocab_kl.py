"""The vocabulary-parallel KL (distillation loss) equals a gathered full-vocabulary KL at TP=2,
values and gradients (its own chunked backward pass), forward and reverse, with temperature,
top-k and vocabulary padding; the LM cross-entropy equals torch's."""

import json

import pytest

from tests.helpers import torchrun


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kl") / "report.json"
    torchrun("vocab_kl.py", 2, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "case", ["forward", "reverse", "forward_T2", "reverse_T2", "top5", "top3_T2", "ce"]
)
def test_matches_gathered_kl(report, case):
    r = report[case]
    assert r["value_diff"] <= 1e-6 * 10, r  # values are O(1-10): 1e-6 relative
    assert r["grad_diff"] <= 1e-6 * max(1.0, r["grad_scale"]), r


def test_zero_when_student_equals_teacher(report):
    assert report["equal_loss"] <= 1e-6 and report["equal_grad"] <= 1e-6


def test_different_vocabularies_are_refused(report):
    assert report["mismatch_refused"]
