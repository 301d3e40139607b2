"""The guard's answer, read strictly (spec §7.2 cases, plus what a strict reader must refuse)."""

import pytest

from corral.safety.verdict import GuardOutputError, Verdict, parse_verdict

CODES = [f"S{i}" for i in range(1, 15)]


@pytest.mark.parametrize("text, expected", [
    ("safe", Verdict(True)),
    ("  safe\n", Verdict(True)),
    ("unsafe\nS1,S10", Verdict(False, ("S1", "S10"), ("S1", "S10"))),
    ("unsafe\nS3", Verdict(False, ("S3",), ("S3",))),
    ("unsafe\nS2, S14 ", Verdict(False, ("S2", "S14"), ("S2", "S14"))),
    ("\nunsafe\nS5,S5\n", Verdict(False, ("S5",), ("S5",))),
])
def test_accepted(text, expected):
    assert parse_verdict(text, codes=CODES) == expected


@pytest.mark.parametrize("text", [
    "", "Safe", "safe.", "safe\nS1", "unsafe", "unsafe\n", "unsafe\nS15", "unsafe\nS1,", "unsafe\nS1 S2",
    "unsafe\nS1\nS2", "unsafe S1", "The content is safe", "unsafe\nViolent Crimes", "unsafe\ns1", "<|eot_id|>",
])
def test_rejected_never_safe(text):
    with pytest.raises(GuardOutputError, match="unexpected guard output"):
        parse_verdict(text, codes=CODES)


def test_excluded_codes():
    assert parse_verdict("unsafe\nS2", codes=CODES, excluded=["S2"]) == Verdict(True, (), ("S2",))
    assert parse_verdict("unsafe\nS2,S9", codes=CODES, excluded=["S2"]) == Verdict(False, ("S9",), ("S2", "S9"))


def test_codes_outside_the_models_policy_are_rejected():
    with pytest.raises(GuardOutputError, match="'S14' is not a category"):
        parse_verdict("unsafe\nS14", codes=CODES[:13])  # the 1B guard has no S14
    assert parse_verdict("unsafe\nC2", codes=["C1", "C2"]).codes == ("C2",)  # custom codes
