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
    ("Compare these images and the files below.", "keyword filter"),  # a keyword's plural is blocked too
    ("Sort the profiles of these users by age.", None),  # 'profiles' is not 'file' + s
    ("Hi there", "too short"),
    (" ".join(["word"] * 21), "too long"),
    ("", "empty"),
    ("- list the planets in order", "starts with punctuation"),
    ("请解释光合作用的过程", None),  # written without spaces: a word per character, not one word
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
    ("Task: Explain tides.", "Explain tides."),
    ("Task-based learning: design a week of lessons.", "Task-based learning: design a week of lessons."),
    ('"Carpe diem" means what, exactly?', '"Carpe diem" means what, exactly?'),
    ('"Carpe diem" or "memento mori"', '"Carpe diem" or "memento mori"'),
])
def test_clean(raw, expected):
    assert clean(raw) == expected


class EchoingWriter:
    """A fake prompt writer whose every answer depends on its whole request (the few-shot examples) and seed."""

    WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud tree apple".split()

    def generate(self, requests, params):
        import hashlib
        import random

        from srlm.backends import Completion

        out = []
        for i, request in enumerate(requests):
            rng = random.Random(hashlib.sha256(f"{request}|{params.seed}|{i}".encode()).hexdigest())
            out.append(Completion(text="Explain " + " ".join(rng.choice(self.WORDS) for _ in range(6)), n_tokens=8,
                                  truncated=False))
        return out


@pytest.mark.parametrize("lines_left", [0, 3, 8, 11, 16, 19, None])  # None: all of it, the last batch too
def test_a_resume_after_a_torn_batch_writes_what_an_uninterrupted_run_writes(tmp_path, lines_left):
    """A kill (or a full disk) in the middle of a batch's write leaves whole lines of part of it; the resumed stage
    must ask that batch again from the prompts kept before it, not from a pool holding its own prompts already."""
    from srlm.prompts import generate_prompts
    from srlm.records import read_jsonl

    seed = [f"Write a poem about {w} and friends today" for w in EchoingWriter.WORDS]
    options = dict(iteration=1, num_prompts=20, batch_size=8, seed=5, max_attempts=80)
    whole, _ = generate_prompts(EchoingWriter(), seed, tmp_path / "a" / "prompts.jsonl", **options)
    lines = (tmp_path / "a" / "prompts_attempts.jsonl").read_text().splitlines(True)
    assert len(lines) > 16  # the cut points fall in the first, second and third batches
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "prompts_attempts.jsonl.partial").write_text("".join(lines[:lines_left]))
    resumed, attempts = generate_prompts(EchoingWriter(), seed, tmp_path / "b" / "prompts.jsonl", **options)
    assert [p.text for p in resumed] == [p.text for p in whole]
    assert (tmp_path / "b" / "prompts_attempts.jsonl").read_text() == "".join(lines)
    assert [p.text for p in read_jsonl(tmp_path / "b" / "prompts.jsonl", type(whole[0]))] == [p.text for p in whole]


class ChangingWriter(EchoingWriter):
    """Samples otherwise each time it is asked (a server, vLLM's batching); every fourth answer runs past the cap."""

    def __init__(self):
        self.calls = 0

    def generate(self, requests, params):
        from dataclasses import replace

        self.calls += 1
        out = super().generate(requests, replace(params, seed=params.seed + 1000 * self.calls))
        return [replace(o, truncated=i % 4 == 3) for i, o in enumerate(out)]


def test_a_torn_batch_asked_again_keeps_what_the_attempts_file_says(tmp_path):
    # Asked again, the batch's logged attempts were skipped by the log but their new texts kept: prompts.jsonl held
    # prompts that prompts_attempts.jsonl never saw.
    from srlm.prompts import CUT, generate_prompts

    seed = [f"Write a poem about {w} and friends today" for w in EchoingWriter.WORDS]
    options = dict(iteration=1, num_prompts=12, batch_size=8, seed=5, max_attempts=80)
    generate_prompts(ChangingWriter(), seed, tmp_path / "a" / "prompts.jsonl", **options)
    lines = (tmp_path / "a" / "prompts_attempts.jsonl").read_text().splitlines(True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "prompts_attempts.jsonl.partial").write_text("".join(lines[:11]))
    prompts, attempts = generate_prompts(ChangingWriter(), seed, tmp_path / "b" / "prompts.jsonl", **options)
    assert [p.text for p in prompts] == [a.text for a in attempts if a.kept] and len(prompts) == 12
    assert (tmp_path / "b" / "prompts_attempts.jsonl").read_text().splitlines(True)[:11] == lines[:11]
    # An answer that ran past prompts.max_new_tokens is part of a prompt: never kept.
    assert {a.reason for a in attempts if int(a.id[-6:]) % 4 == 3} == {CUT}


@pytest.mark.parametrize("a,b", [
    ("Объясни, как образуется радуга.", "Объясни, как образуется радуга после дождя."),
    ("解释光合作用的过程", "请解释光合作用的过程"),
    ("Explique cómo se forma un arcoíris.", "Explique cómo se forma el arcoíris."),
])
def test_near_duplicates_in_any_script_are_too_similar(a, b):
    # rouge_score's own tokenizer keeps [a-z0-9] only: these pairs scored 0 and passed the filter.
    assert rouge_l(a, b) > 0.7
    assert filter_reason(b, [a], **RULES) == "too similar (ROUGE-L)"


def test_english_scores_as_rouge_score_scores_them():
    from rouge_score import rouge_scorer

    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for a, b in [("List three uses of vinegar.", "list 3 uses of baking-soda!"), *zip(EXISTING, EXISTING[::-1])]:
        assert rouge_l(a, b) == pytest.approx(plain.score(a, b)["rougeL"].fmeasure)


def test_prompts_of_earlier_iterations_are_not_written_again(tmp_path):
    from srlm.prompts import generate_prompts

    seed = [f"Write a poem about {w} and friends today" for w in EchoingWriter.WORDS]
    options = dict(iteration=2, num_prompts=8, batch_size=8, seed=5, max_attempts=16)
    first, _ = generate_prompts(EchoingWriter(), seed, tmp_path / "a" / "prompts.jsonl", **options)
    again, attempts = generate_prompts(EchoingWriter(), seed, tmp_path / "b" / "prompts.jsonl",
                                       earlier=[p.text for p in first], **options)
    # The first batch asks what it asked before and gets the same texts: each is now a duplicate.
    assert [a.reason for a in attempts[:len(first)]] == ["duplicate"] * len(first)
    assert not {p.text for p in again} & {p.text for p in first}
