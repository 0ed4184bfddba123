import pytest

from srlm.prompts import clean, few_shot_request, filter_reason, rouge_l

RULES = dict(min_words=3, max_words=20, blocked_keywords=["image", "file"], rouge_l_max=0.7)
EXISTING = ["Give me three tips for sleeping better.", "Explain how a rainbow forms."]


@pytest.mark.parametrize("text,reason", [
    ("Write a limerick about a forgetful octopus.", None),
    ("Give me three tips for sleeping better tonight.", "too similar (ROUGE-L)"),
    ("explain how a rainbow forms.", "duplicate"),
    ("Describe this image in detail please.", "keyword filter"),
    ("Summarize the attached file for me.", "keyword filter"),
    ("Profile of imagery in poetry and its role.", None),  # 'imagery' is not the keyword 'image'
    ("Hi there", "too short"),
    (" ".join(["word"] * 21), "too long"),
    ("", "empty"),
    ("- list the planets in order", "starts with punctuation"),
])
def test_self_instruct_filters(text, reason):
    assert filter_reason(text, EXISTING, **RULES) == reason


def test_rouge_l_is_symmetric_and_bounded():
    a, b = "list three uses of vinegar", "list three uses of baking soda"
    assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))
    assert 0 < rouge_l(a, b) < 1
    assert rouge_l(a, a) == 1.0


def test_few_shot_request_numbers_examples_and_asks_for_the_next():
    text = few_shot_request(["First task?", "Second\ntask with\nnewlines."])
    assert "Task 1: First task?\nTask 2: Second task with newlines.\nTask 3:" in text
    assert text.endswith("Task 3:")


@pytest.mark.parametrize("raw,expected", [
    (" Task 9: Name two rivers in Africa. ", "Name two rivers in Africa."),
    ('"Plan a picnic for six people."', "Plan a picnic for six people."),
    ("task 10 - Explain tides.", "Explain tides."),
])
def test_clean(raw, expected):
    assert clean(raw) == expected
