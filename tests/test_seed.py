"""The shipped seed data: schema, size, score coverage, and no prompt shared between IFT and EFT."""
from collections import Counter

from srlm.judging import parse_score
from srlm.prompts import rouge_l
from srlm.seed import balanced_head, load_eft, load_ift


def test_shipped_ift_is_large_and_varied():
    ift = load_ift()
    assert len(ift) >= 300
    categories = Counter(x.category for x in ift)
    assert {"advice", "explanation", "writing", "coding", "math", "brainstorming"} <= set(categories)
    assert len({x.prompt.strip().lower() for x in ift}) == len(ift)


def test_shipped_eft_covers_every_score_evenly():
    eft = load_eft()
    assert len(eft) >= 300
    scores = Counter(x.score for x in eft)
    assert set(scores) == {0, 1, 2, 3, 4, 5}
    assert max(scores.values()) / len(eft) <= 0.30
    for x in eft:
        assert parse_score(x.judgment) == (x.score, None)
        assert x.judgment.rstrip().endswith(f"Score: {x.score}")


def test_no_prompt_is_both_ift_and_eft():
    ift = {x.prompt.strip().lower() for x in load_ift()}
    eft = {x.prompt.strip().lower() for x in load_eft()}
    assert not ift & eft
    # Short prompts of one template ("What is the difference between X and Y?") reach ROUGE-L 0.8 on different
    # topics; the same task reworded scores above 0.85.
    close = [(a, b) for a in eft for b in ift if rouge_l(a, b) > 0.85]
    assert close == []


def test_limited_eft_still_teaches_every_score():
    subset = load_eft(limit=12)
    assert Counter(x.score for x in subset) == {s: 2 for s in range(6)}
    assert balanced_head(load_eft(), 7)[6].score == 0


def test_a_limit_that_cuts_the_users_own_file_is_said_once(tmp_path, capsys):
    from srlm.seed import shipped

    mine = tmp_path / "ift.jsonl"
    mine.write_text(shipped("ift").read_text())
    total = len(load_ift(mine))
    assert len(load_ift(mine, 24)) == 24 and len(load_ift(mine, 24)) == 24  # checked at the door, then loaded
    err = capsys.readouterr().err
    assert err.count(f"{mine}: using the first 24 of {total} examples (data.ift_limit=24; --set data.ift_limit=null "
                     "for all)") == 1
    load_ift(None, 24), load_eft(None, 36)  # the shipped seed: the preset's choice, not news
    assert capsys.readouterr().err == ""
    mine_eft = tmp_path / "eft.jsonl"
    mine_eft.write_text(shipped("eft").read_text())
    load_eft(mine_eft, 36)
    assert f"{mine_eft}: using a score-balanced 36 of" in capsys.readouterr().err
