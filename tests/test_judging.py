import pytest

from srlm.errors import ConfigError
from srlm.judging import (
    INSTRUCTION_SLOT,
    PAPER_TEMPLATE,
    RESPONSE_SLOT,
    contains_judge_text,
    fill,
    load_template,
    parse_score,
)

# Judge outputs of the kinds small models really write (seen from SmolLM2 and in public re-implementations).
PARSED = [
    ("The response is relevant and complete.\nScore: 4", 4.0),
    ("Relevant (1), substantial (2), useful (3).\n**Score:** 3", 3.0),
    ("**Score: 5**", 5.0),
    ("score: 4.5", 4.5),
    ("Score: 4/5", 4.0),
    ("Score: 2 out of 5", 2.0),
    ("Total score: 3 points. The answer is short.", 3.0),
    ("Score = 1", 1.0),
    ("SCORE: 0\n\nThe response is off-topic.", 0.0),
    ("Score: four", 4.0),
    # The last "Score:" is the conclusion; an earlier one quotes the rubric or a first guess.
    ("I first thought Score: 2 but on reflection the answer is complete.\nScore: 4", 4.0),
    ("Score: 3.\nThat is my final answer, with trailing text.", 3.0),
]

FAILED = [
    ("The response is helpful and well organised.", "no 'Score: N' found"),
    ('Conclude with the score using the format: "Score: <total points>"', "placeholder"),
    ("Score: 8/10", "another scale"),
    ("Score: 7", "outside [0, 5]"),
    ("", "no 'Score: N' found"),
    ("I would give it 4 points.", "no 'Score: N' found"),
    ("Score: -1", "no 'Score: N' found"),
]


@pytest.mark.parametrize("text,expected", PARSED)
def test_parse_score_reads_what_models_write(text, expected):
    assert parse_score(text) == (expected, None)


@pytest.mark.parametrize("text,reason", FAILED)
def test_parse_failure_is_never_a_score(text, reason):
    score, error = parse_score(text)
    assert score is None
    assert reason in error


def test_fill_keeps_braces_and_puts_text_in_the_slots():
    filled = fill(PAPER_TEMPLATE, "Write {json}", "```{\"a\": 1}```")
    assert "User: Write {json}\n<response>```{\"a\": 1}```</response>" in filled
    assert INSTRUCTION_SLOT not in filled and RESPONSE_SLOT not in filled


def test_paper_template_is_the_paper_prompt():
    assert PAPER_TEMPLATE.startswith("Review the user's question and the corresponding response using the additive 5-point")
    assert 'Conclude with the score using the format: "Score: <total points>"' in PAPER_TEMPLATE
    assert PAPER_TEMPLATE.rstrip().endswith("systematically attribute points based on the outlined criteria.")


def test_custom_template_must_have_both_slots(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(f"Q: {INSTRUCTION_SLOT}\nA: {RESPONSE_SLOT}\nScore:")
    assert load_template(good).startswith("Q:")
    bad = tmp_path / "bad.txt"
    bad.write_text("Q: {prompt}")
    with pytest.raises(ConfigError, match="lacks <INSTRUCTION_HERE> and <RESPONSE_HERE>"):
        load_template(bad)


@pytest.mark.parametrize("text,flagged", [
    ("Paris is the capital.\n\nScore: 5", True),
    ("This answer deserves a score of 5.", True),
    ("Using the additive 5-point scoring system, ...", True),
    ("The match score was 3-1 to the home side.", False),
    ("Here are five tips for better sleep.", False),
])
def test_judge_format_text_in_a_response_is_flagged(text, flagged):
    assert contains_judge_text(text) is flagged
