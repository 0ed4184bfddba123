from pathlib import Path

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
    ("Score: 3 - the answer is accurate but short.", 3.0),
    ("Score: 4, since it answers the question.", 4.0),
    ("The subscore: 1 for relevance.\nScore: 2", 2.0),
    # The additive rubric's sum, concluded by its total.
    ("Score: 1 + 1 + 1 = 3", 3.0),
    ("Score: 1+1+1+1 = 4 points", 4.0),
    ("Score: one + two = three", 3.0),
    ("Score: 1 + 1 + 1 = **3**", 3.0),
    # A score followed by a remark with a number is not a choice of two.
    ("Score: 3, 2 points were deducted for length.", 3.0),
    # The prompt's "Score: <total points>" filled in, brackets and all.
    ("Score: <4>", 4.0),
    ("Score: [2]", 2.0),
    ("**Score:** (5)", 5.0),
    # Scores of parts are not the verdict, before it or after it.
    ("Relevance score: 1\nUsefulness score: 1\nScore: 2", 2.0),
    ("Score: 4\n(criterion 5 score: 0)", 4.0),
    ("- Point 1 (relevance) score: 1\n**Total score:** 3", 3.0),
    ("Therefore, Score: 3", 3.0),
    ("It is accurate. Score: 4\nScore: 4", 4.0),
    ("Score: 3 (out of 5)", 3.0),
    # One labelled list item is a verdict; labels that name the whole never make a list of criteria.
    ("- Justification: relevant and complete. Score: 4", 4.0),
    ("1. Summary: relevant. Score: 4\n2. Conclusion: Score: 4", 4.0),
    ("- Relevant: yes (+1)\n- Substantial: yes (+1)\n- Score: 2", 2.0),
]

FAILED = [
    ("The response is helpful and well organised.", "no 'Score: N' found"),
    ('Conclude with the score using the format: "Score: <total points>"', "placeholder"),
    ("Score: 8/10", "another scale"),
    ("Score: 7", "outside [0, 5]"),
    ("", "no 'Score: N' found"),
    ("I would give it 4 points.", "no 'Score: N' found"),
    ("Score: -1", "no 'Score: N' found"),
    # Not one score: a range or a choice is a failure, not its first number.
    ("Score: 3-4", "not one score (3-4)"),
    ("Score: 3 or 4", "not one score"),
    ("Score: three to four", "not one score"),
    ("Score: 4,5", "not one score"),
    ("Score: 2\nOn reflection, Score: 3 - 4", "not one score"),
    ("Score: 2, 3", "not one score (2, 3)"),
    # A sum is read by its total, and only when the total is the sum: not its first term.
    ("Score: 1 + 1 + 1", "a sum without its total (1 + 1 + 1)"),
    ("Score: 1 + 1 + 1 = 4", "a total that is not the sum"),
    ("Score: 2 + 2 + 2 = 6", "outside [0, 5]"),
    ("Score: 1 + 1 + 1 = 3 - 4", "not one score (1 + 1 + 1 = 3 - 4)"),
    ("**Score: 2, 3**", "not one score (2, 3)"),
    # "score" inside another word is no score.
    ("The underscore: 1 is a character.", "no 'Score: N' found"),
    ("Score: <4", "no 'Score: N' found"),  # an unclosed bracket is no verdict
    # Scores of parts with no verdict: the last of them is not the total.
    ("Relevance score: 1\nExpert score: 0\nTotal: 4", "no verdict 'Score: N', only scores of parts or led by other "
     "words (Relevance score: 1)"),
    # The rubric's criteria scored item by item: each line looks like a verdict, the total is elsewhere.
    ("- Relevant: yes. Score: 1\n- Substantial: yes. Score: 1\n- Basic elements: yes. Score: 1\nTotal points: 3",
     "only scores of parts or led by other words (- Relevant: yes. Score: 1)"),
    ("1. Relevance: Score: 1 - on topic.\n2. Substance: Score: 1\n3. Usefulness: the response cov",
     "only scores of parts"),
    # A score revised after it, or out of another scale in brackets.
    ("Score: 4 → 3", "a score revised after it"),
    ("score: 4 -> 3", "a score revised after it"),
    ("Score: 5 points minus 1 = 4", "a score revised after it"),
    ("Score: 3 (out of 4)", "another scale (3/4)"),
    # Verdicts that disagree: the judge went on past its conclusion (a made-up next turn, a comparison).
    ("Score: 4\n\nUser: What is 2+2?\n<response>4</response>\nScore: 2", "verdicts that disagree (4, then 2)"),
    ("Score: 4\n\nFor comparison, an unhelpful answer would get a score: 1.", "verdicts that disagree (4, then 1)"),
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


def test_a_slot_name_inside_the_prompt_is_text_not_a_slot():
    filled = fill(PAPER_TEMPLATE, "What does <RESPONSE_HERE> mean?", "A placeholder.")
    assert "User: What does <RESPONSE_HERE> mean?\n<response>A placeholder.</response>" in filled


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


def test_a_template_with_brace_slots_is_read_like_the_paper_copy_in_oasst2_srlm(tmp_path):
    braced = tmp_path / "orig.txt"
    braced.write_text("Rate {this}.\nUser: {prompt}\n<response>{response}</response>\nScore:")
    template = load_template(braced)
    filled = fill(template, "Print {x}", "print({x}) # {response}")
    assert filled == "Rate {this}.\nUser: Print {x}\n<response>print({x}) # {response}</response>\nScore:"
    shipped = Path(__file__).parents[2] / "shared/data/oasst2-srlm/llm_as_a_judge_prompt_orig.txt"
    if shipped.exists():  # the data is not part of the project: checked where it is
        filled = fill(load_template(shipped), "Q", "A")
        assert "User: Q\n<response>A</response>" in filled and "{prompt}" not in filled


@pytest.mark.parametrize("text,flagged", [
    ("Paris is the capital.\n\nScore: 5", True),
    ("This answer deserves a score of 5.", True),
    ("Using the additive 5-point scoring system, ...", True),
    ("The match score was 3-1 to the home side.", False),
    ("My credit score: 720, and yours?", False),
    # A verdict the judge's parser would read is flagged: markdown, words, a leading zero.
    ("**Score:** 5", True),
    ("Score: five", True),
    ("Score: 05", True),
    ("Here are five tips for better sleep.", False),
    ("Answer first.\nFinal score: 3", True),
    # What answers about games, exams and code say is not judge text.
    ("Quiz score: 3.5 of 5", False),
    ("You need a score of 5 or higher on the AP exam.", False),
    ("def play():\n    score = 0\n    return score", False),
    ("self.score = 0", False),
    ("Score = 5", False),
    ("```python\nprint('Score: 5')\n```", False),
    ("Set `score: 5` in the config.", False),
])
def test_judge_format_text_in_a_response_is_flagged(text, flagged):
    assert contains_judge_text(text) is flagged


# -- the expected judge mode -------------------------------------------------------------------------------

def test_expected_score_is_the_renormalised_mean_and_fails_without_mass():
    from srlm.judging import expected_score

    assert expected_score([0, 0, 0, 0.25, 0.25, 0], 0.5) == (3.5, None)
    assert expected_score([0.1, 0, 0, 0, 0, 0.5], 0.5) == (pytest.approx(2.5 / 0.6), None)
    score, error = expected_score([0.1, 0.1, 0, 0, 0, 0.1], 0.5)
    assert score is None and "got 30% of the probability" in error


@pytest.fixture(scope="module")
def tiny_generator(tiny_model):
    from srlm.backends import HFGenerator
    from srlm.config import ModelConfig

    return HFGenerator(tiny_model, ModelConfig(), "cpu", batch_size=3)


def test_prefix_reuse_gives_the_same_probabilities(tiny_generator):
    from srlm.judging import SCORE_CHOICES, judge_request

    requests = [judge_request(PAPER_TEMPLATE, f"Question number {i}?", "An answer " * i) for i in range(5)]
    prefix, rows = tiny_generator._split_prefix([tiny_generator.render(r) + "Score:" for r in requests])
    assert len(prefix) > 100 and rows is not None  # the rubric is shared and cut cleanly
    plain = tiny_generator.choice_probs(requests, "Score:", SCORE_CHOICES, reuse_prefix=False)
    reused = tiny_generator.choice_probs(requests, "Score:", SCORE_CHOICES, reuse_prefix=True)
    for a, b in zip(plain, reused):
        assert len(a) == 6 and 0 < sum(a) <= 1.0001
        assert a == pytest.approx(b, abs=1e-5)


def test_scoring_in_length_groups_gives_the_probabilities_of_one_batch(tiny_generator, monkeypatch):
    from srlm.backends import hf
    from srlm.judging import SCORE_CHOICES, judge_request

    requests = [judge_request(PAPER_TEMPLATE, f"Question {i}?", "words " * (7 * i)) for i in range(6)]
    monkeypatch.setattr(tiny_generator, "batch_size", 6)
    monkeypatch.setattr(hf, "PREFILL_TOKENS", {"cpu": 10**6})
    one_batch = tiny_generator.choice_probs(requests, "Score:", SCORE_CHOICES)
    monkeypatch.setattr(hf, "PREFILL_TOKENS", {"cpu": 60})  # a row or two per forward pass
    grouped = tiny_generator.choice_probs(requests, "Score:", SCORE_CHOICES)
    for a, b in zip(one_batch, grouped):
        assert a == pytest.approx(b, abs=1e-5)


def test_length_groups_bound_rows_and_padded_tokens():
    from srlm.backends.hf import length_groups

    lengths = [50, 10, 12, 200, 11, 49]
    groups = length_groups(lengths, max_rows=2, max_tokens=100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert groups == [[1, 4], [2, 5], [0], [3]]  # shortest first; 200 alone, over the budget by itself
    for g in groups:
        assert len(g) <= 2 and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 100)


def test_a_shared_prefix_leaves_every_row_a_token(tiny_generator):
    texts = ["Line one of a shared header, long enough to be worth caching for sure.\n" * 3,
             "Line one of a shared header, long enough to be worth caching for sure.\n" * 3 + "and more"]
    prefix, rows = tiny_generator._split_prefix(texts)
    assert rows is None or all(rows)


def test_expected_judging_writes_one_scored_judgment_per_candidate_and_resumes(tiny_generator, tmp_path):
    from srlm.judging import judge_expected
    from srlm.records import Candidate, Judgment, Prompt, read_jsonl

    prompts = [Prompt(id=f"p{i}", text=f"Question {i}?", iteration=1) for i in range(2)]
    candidates = [Candidate(id=f"p{i}-c{n}", prompt_id=f"p{i}", index=n, text=f"Answer {n} " * (n + 1))
                  for i in range(2) for n in range(3)]
    out = judge_expected(tiny_generator, prompts, candidates, tmp_path / "j.jsonl", min_mass=0.0)
    assert [j.candidate_id for j in out] == [c.id for c in candidates]
    for j in out:
        assert j.error is None and 0 <= j.score <= 5 and len(j.score_probs) == 6
    again = judge_expected(tiny_generator, prompts, candidates, tmp_path / "j.jsonl", min_mass=0.0)
    assert again == out
    assert sorted(read_jsonl(tmp_path / "j.jsonl", Judgment), key=lambda j: j.id) == sorted(out, key=lambda j: j.id)
    strict = judge_expected(tiny_generator, prompts, candidates, tmp_path / "strict.jsonl", min_mass=1.0)
    assert all(j.score is None and "of the probability" in j.error for j in strict)


def test_expected_mode_needs_token_probabilities(tmp_path):
    from srlm.judging import judge_expected

    class TextOnly:
        def generate(self, requests, params):
            return []

    with pytest.raises(ConfigError, match="the hf and vllm backends"):
        judge_expected(TextOnly(), [], [], tmp_path / "j.jsonl")
