"""Head-to-head evaluation: verdict parsing, the both-orders rule and the statistics against values worked out by
hand, then `srlm eval h2h` end to end with a scripted judge behind the loopback OpenAI-compatible server."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from openai_server import OpenAIServer
from srlm import cli
from srlm.backends import SamplingParams
from srlm.cli import main
from srlm.errors import InputError
from srlm.h2h import (
    CONVENTIONS,
    PAIRWISE_TEMPLATE,
    H2HOutput,
    Instruction,
    PairVerdict,
    Side,
    bootstrap_ci,
    combine,
    fill_pairwise,
    judge_pairs,
    length_controlled_win_rate,
    load_instructions,
    load_outputs,
    model_winner,
    parse_verdict,
    rates,
    render,
    separated_by_length,
    side_outputs,
    summarize,
)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "h2h_reference_outputs.json"

# --- the judge's verdict ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, label", [
    ("Response A answers the question directly.\nWinner: A", "A"),
    ("**Winner:** Response B", "B"),
    ("Both are equally vague.\n\nWinner: Tie.", "tie"),
    ("Winner: (B)", "B"),
    ("winner:a", "A"),
    ("Verdict -- Winner: Assistant A, because it is correct.", "A"),
    ("Winner: draw", "tie"),
    ("Winner: A. The winner is clear.", "A"),
    ("Winner: B\n...\nWinner: B", "B"),  # repeated, agreeing
    ("Winner: a tie", "tie"),
    ("Winner: A tie between the two.", "tie"),
])
def test_verdicts_that_parse(text, label):
    assert parse_verdict(text) == (label, None)


@pytest.mark.parametrize("text, error", [
    ("Response A is better than Response B.", "no 'Winner: A/B/tie' found"),
    ("Winner: A or B or tie", "the format copied from the prompt instead of a verdict"),
    ("Winner: <A, B or tie>", "placeholder copied from the prompt instead of a verdict"),
    ("Winner: A\nOn reflection, Winner: B", "conflicting verdicts (A, B)"),
    # A small judge echoing the prompt's last line: three verdicts, none of them its own.
    ("give your verdict on a final line: Winner: A (Response A is better), Winner: B (Response B is better) or "
     "Winner: tie (neither is better).", "conflicting verdicts (A, B, tie)"),
    ("Winner: both", "'Winner: both' is not A, B or tie"),
    ("Winner: A/B/tie", "the format copied from the prompt instead of a verdict"),
    ("Winner: [A|B|tie]", "the format copied from the prompt instead of a verdict"),
    ("Winner: A and B are equally good", "'Winner: a and b' names both"),
    ("The breadwinner: B", "no 'Winner: A/B/tie' found"),
    ("Winner:", "'Winner:' without a verdict"),
    ("", "no 'Winner: A/B/tie' found"),
])
def test_verdicts_that_fail_are_never_guessed(text, error):
    assert parse_verdict(text) == (None, error)


def test_positions_map_back_to_models():
    assert [model_winner(x, "ab") for x in ("A", "B", "tie", None)] == ["a", "b", "tie", None]
    assert [model_winner(x, "ba") for x in ("A", "B", "tie", None)] == ["b", "a", "tie", None]


@pytest.mark.parametrize("ab, ba, outcome", [
    ("a", "a", "win"), ("b", "b", "loss"), ("tie", "tie", "tie"),
    ("a", "b", "tie"), ("b", "a", "tie"), ("a", "tie", "tie"), ("tie", "b", "tie"),  # orders disagree: a tie
    (None, "a", None), ("b", None, None), (None, None, None),  # a failed order: no outcome
])
def test_both_orders_rule(ab, ba, outcome):
    assert combine(ab, ba) == outcome


def test_fill_leaves_slot_names_and_braces_in_responses_alone():
    filled = fill_pairwise(PAIRWISE_TEMPLATE, "Q {x}", "says <RESPONSE_B_HERE>", "{}")
    assert "[Instruction]\nQ {x}\n" in filled
    assert "[Response A]\nsays <RESPONSE_B_HERE>\n[End of Response A]" in filled
    assert "[Response B]\n{}\n[End of Response B]" in filled


# --- statistics ---------------------------------------------------------------------------------------------


def test_rates_hand_computed():
    r = rates(["win", "win", "tie", "loss", "tie"])
    assert r["counts"] == {"win": 2, "tie": 2, "loss": 1}
    assert r["rates"] == {"win": 0.4, "tie": 0.4, "loss": 0.2}
    assert r["win_rate"] == pytest.approx(0.6)
    assert rates([]) == {"counts": {"win": 0, "tie": 0, "loss": 0}, "rates": {"win": None, "tie": None, "loss": None},
                         "win_rate": None}


def test_bootstrap_ci():
    ones = np.ones(5)
    assert bootstrap_ci(lambda idx: float(ones[idx].mean()), 5) == [1.0, 1.0]  # all wins: no spread
    # One win, one loss: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles of 1000 resamples are 0 and 1.
    half = np.array([1.0, 0.0])
    assert bootstrap_ci(lambda idx: float(half[idx].mean()), 2) == [0.0, 1.0]
    assert bootstrap_ci(lambda idx: 1.0, 0) is None
    scores = np.array([1, 0.5, 0, 1, 1, 0.5, 0, 1], dtype=float)
    first = bootstrap_ci(lambda idx: float(scores[idx].mean()), len(scores), seed=3)
    assert first == bootstrap_ci(lambda idx: float(scores[idx].mean()), len(scores), seed=3)  # fixed seed
    assert first[0] < scores.mean() < first[1]


def test_length_controlled_win_rate_saturated_model():
    # Two length groups, so the fit is saturated: sigmoid(b0 + b1 c) = 6/8 for the 8 prompts where A is longer,
    # sigmoid(b0 - b1 c) = 1/2 for the 2 where it is shorter (c = tanh(10 / std), the same for both because
    # the differences are +-10). Then b0 = (logit 3/4 + logit 1/2) / 2 = ln(3) / 2, and the LC win rate
    # sigmoid(b0) = sqrt(3) / (1 + sqrt(3)) = 0.634, below the raw 0.7: some of A's wins came from length.
    scores = [1] * 6 + [0] * 2 + [1, 0]
    diffs = [10] * 8 + [-10] * 2
    lc, coef = length_controlled_win_rate(scores, diffs)
    assert lc == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-3)
    c = math.tanh(10 / np.std(diffs))
    assert coef == pytest.approx(math.log(3) / (2 * c), abs=1e-2)
    # Ties split: two ties weigh as one win and one loss, so the same group means give the same fit.
    with_ties = [1] * 5 + [0.5] * 2 + [0] + [0.5, 0.5]
    assert length_controlled_win_rate(with_ties, diffs)[0] == pytest.approx(lc, abs=1e-9)


def test_no_length_controlled_win_rate_when_length_alone_separates_wins_from_losses():
    # A wins exactly where it is longer: the fit has no maximum, and what a penalised fit gives depends on the
    # penalty and on where the gap lies (2/3 for +-10 words, 0.013 for the spread below), not on the judge.
    assert length_controlled_win_rate([1] * 8 + [0] * 2, [10] * 8 + [-10] * 2) is None
    rng = np.random.default_rng(1)
    diffs = np.concatenate([rng.uniform(40, 200, 40), rng.uniform(-20, -2, 10)])
    scores = (diffs > 0).astype(float)
    assert separated_by_length(scores, diffs) and length_controlled_win_rate(scores, diffs) is None
    assert separated_by_length(1 - scores, diffs)  # every win shorter: the same
    assert not separated_by_length([1, 0, 1, 0], [5, 3, -1, -2])  # a loss longer than a win
    assert not separated_by_length([1, 1, 1], [5, -3, 2])  # no loss to separate from
    assert separated_by_length([1, 0.5, 0], [5, 1, -3])  # a tie in the gap: the fit's boundary sits on it
    assert not separated_by_length([1, 0.5, 0], [5, 9, -3])  # a tie beyond a win bounds the slope
    # Every resample of separated outcomes is separated: no interval either.
    assert bootstrap_ci(lambda idx: (length_controlled_win_rate(scores[idx], diffs[idx]) or (None,))[0],
                        len(scores), resamples=50) is None


def test_length_controlled_win_rate_degenerate_cases():
    assert length_controlled_win_rate([1, 0.5, 0, 1], [3, 3, 3, 3]) == (0.625, 0.0)  # no spread: the raw win rate
    assert length_controlled_win_rate([1, 1, 1], [5, -2, 0]) == (1.0, 0.0)  # all wins
    assert length_controlled_win_rate([0, 0], [5, -2]) == (0.0, 0.0)
    assert length_controlled_win_rate([], []) is None
    # Symmetric data: no length effect either way.
    lc, coef = length_controlled_win_rate([1, 0, 1, 0], [4, 4, -4, -4])
    assert lc == pytest.approx(0.5) and coef == pytest.approx(0.0, abs=1e-9)


def output(pid, text, n_tokens=None):
    return H2HOutput(id=pid, instruction=f"q{pid}", text=text, generator="m", n_tokens=n_tokens)


def verdict(pid, order, label):
    return PairVerdict(id=f"{pid}-{order}", prompt_id=pid, order=order, text=f"Winner: {label}", label=label,
                       winner=model_winner(label, order), error=None if label else "no 'Winner: A/B/tie' found")


def test_the_default_judge_must_choose_as_the_papers_alpacaeval_judge_does():
    """PAPER.md §5: a tie is the two orders disagreeing; the default prompt offers the judge none of its own."""
    assert "Winner: tie" not in PAIRWISE_TEMPLATE and "Winner: A" in PAIRWISE_TEMPLATE
    assert "Winner: B" in PAIRWISE_TEMPLATE and "ties" in CONVENTIONS


def test_summarize_hand_computed():
    a = [output("1", "one two three", 3), output("2", "one", 1), output("3", "a b", 2), output("4", "x", 1),
         output("5", "a b c d", 4)]
    b = [output("1", "one", 1), output("2", "one two three", 3), output("3", "a b", 2), output("4", "x y", 2),
         output("5", "e", 1)]
    verdicts = [
        verdict("1", "ab", "A"), verdict("1", "ba", "B"),      # A wins in both orders
        verdict("2", "ab", "B"), verdict("2", "ba", "A"),      # B wins in both orders
        verdict("3", "ab", "A"), verdict("3", "ba", "A"),      # position bias: the orders disagree -> tie
        verdict("4", "ab", "tie"), verdict("4", "ba", "tie"),  # a tie in both orders
        verdict("5", "ab", "A"), verdict("5", "ba", None),     # one failed order: prompt excluded
    ]
    s = summarize(a, b, verdicts, resamples=200)
    assert s["counts"] == {"win": 1, "tie": 2, "loss": 1}
    assert s["rates"] == {"win": 0.25, "tie": 0.5, "loss": 0.25}
    assert s["win_rate"] == 0.5
    assert (s["prompts"], s["judged_prompts"], s["excluded_prompts"]) == (5, 4, 1)
    assert (s["judgments"], s["parse_failures"], s["order_disagreements"]) == (10, 1, 1)
    # Over the judged prompts 1-4 only: "A" in 1-ab, 2-ba, 3-ab, 3-ba of 6 (5-ab is an excluded prompt's).
    assert s["first_position_preference"] == pytest.approx(4 / 6)
    # Characters: A 13 + 3 + 3 + 1 + 7 = 27, B 3 + 13 + 3 + 3 + 1 = 23, over 5 prompts.
    assert s["length"] == {"a": {"mean_tokens": 2.2, "mean_words": 2.2, "mean_chars": 5.4, "truncated": 0},
                           "b": {"mean_tokens": 1.8, "mean_words": 1.8, "mean_chars": 4.6, "truncated": 0}}
    # Judged prompts 1-4: scores 1, 0, 0.5, 0.5, word differences +2, -2, 0, -1.
    assert s["lc_win_rate"] == length_controlled_win_rate([1, 0, 0.5, 0.5], [2, -2, 0, -1])[0]
    assert s["win_rate_ci95"] == bootstrap_ci(lambda idx: float(np.array([1, 0, 0.5, 0.5])[idx].mean()), 4,
                                              resamples=200)
    assert s["bootstrap"] == {"resamples": 200, "seed": 0, "level": 0.95}


def test_summarize_with_every_verdict_failed():
    a, b = [output("1", "x")], [output("1", "y")]
    s = summarize(a, b, [verdict("1", "ab", None), verdict("1", "ba", None)])
    assert s["judged_prompts"] == 0 and s["parse_failures"] == 2
    assert s["win_rate"] is None and s["win_rate_ci95"] is None and s["lc_win_rate"] is None
    # A file's outputs have no token counts.
    assert s["length"]["a"] == {"mean_tokens": None, "mean_words": 1.0, "mean_chars": 1.0, "truncated": 0}


def test_responses_cut_at_the_length_cap_are_counted_and_shown():
    a = [output("1", "cut off mid", 3).model_copy(update={"truncated": True}), output("2", "done", 1)]
    b = [output("1", "fine", 1), output("2", "fine too", 2)]
    s = summarize(a, b, [verdict(p, o, "B") for p in "12" for o in ("ab", "ba")])
    assert (s["length"]["a"]["truncated"], s["length"]["b"]["truncated"]) == (1, 0)
    shown = render({**s, "a": "M2", "b": "M1", "judge": "self"})
    assert "cut at the length cap" in shown and shown.splitlines()[-2].endswith("   1")
    legacy = {**s, "a": "M2", "b": "M1", "judge": "self",
              "length": {k: {"mean_tokens": 1.0, "mean_words": 1.0} for k in "ab"}}  # an older h2h.json
    assert render(legacy).splitlines()[-1].endswith("   -")


# --- reading prompts and outputs ----------------------------------------------------------------------------


def test_prompts_in_every_supported_format(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "text": "Say hi.", "iteration": 1, "source": "generated"}\n\n'
                       '{"id": "p2", "text": "Say bye.", "iteration": 1, "source": "user"}\n')
    assert load_instructions(prompts) == [Instruction("p1", "Say hi."), Instruction("p2", "Say bye.")]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "First?"}\n{"prompt": "Second?", "id": 7}\n')
    assert load_instructions(rows) == [Instruction("0000", "First?"), Instruction("7", "Second?")]
    alpaca = load_instructions(REFERENCE)
    assert [x.id for x in alpaca] == ["0000", "0001", "0002"] and alpaca[2].text == "What is 12 times 12?"
    # MT-Bench question.jsonl: the first turn; Self-Instruct user-oriented: instruction + first instance's input;
    # IFEval: its key is the id.
    mt = tmp_path / "question.jsonl"
    mt.write_text('{"question_id": 81, "category": "writing", "turns": ["Write a limerick.", "Now in French."]}\n')
    assert load_instructions(mt) == [Instruction("81", "Write a limerick.")]
    user = tmp_path / "user_oriented.jsonl"
    user.write_text('{"id": "u0", "instruction": "Fix the grammar.", "instances": [{"input": "me go home", '
                    '"output": "I go home."}]}\n{"id": "u1", "instruction": "Name a colour.", "instances": '
                    '[{"input": "", "output": "Blue."}]}\n')
    assert load_instructions(user) == [Instruction("u0", "Fix the grammar.\n\nme go home"),
                                       Instruction("u1", "Name a colour.")]
    ifeval = tmp_path / "input_data.jsonl"
    ifeval.write_text('{"key": 1000, "prompt": "Write 3 words.", "instruction_id_list": [], "kwargs": []}\n')
    assert load_instructions(ifeval) == [Instruction("1000", "Write 3 words.")]


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a"}\n{"question": "b"}\n', "line 2: no instruction (expected a non-empty string field "
                                                   "instruction or prompt or text; fields found: question)"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "line 2: duplicate id '1' (first at line 1)"),
    ('[{"instruction": "a"}, "b"]', "array item 1: expected a JSON object, found str"),
    ('{"instruction": "a"\n', "invalid JSON"),
    ("", "file is empty"),
    # A JSON array nested past Python's recursion limit, and a lone surrogate: errors, not tracebacks.
    ("[" * 100_000 + "]" * 100_000, ":1: JSON this reader refuses"),
    ('[\n{"instruction": "\\ud83d\\ude00"},\n{"instruction": "\\ud800a"}]', ":3: an escaped lone surrogate"),
    ('[\n{"instruction": "\\\\udc00 is text"},\n{"instruction": "\\udc00"}]', ":3: an escaped lone surrogate"),
    ('{"instruction": "a"}\n{"instruction": "b\\udc00"}\n', ":2: an escaped lone surrogate"),
    ('{"question_id": 1, "turns": []}\n', "line 1: field 'turns': expected a list whose first item"),
    ('{"instruction": "a", "instances": [{"output": "x"}]}\n', "line 1: field 'instances': expected a list of"),
])
def test_bad_prompt_files_name_the_place(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=str(path)) as error:
        load_instructions(path)
    assert message in str(error.value)


def test_a_prompt_file_may_begin_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "a"}]).encode())
    assert [i.text for i in load_instructions(path)] == ["a"]


def test_reference_outputs_are_matched_by_instruction(tmp_path):
    outputs = load_outputs(REFERENCE)
    assert outputs["What is 12 times 12?"] == "144."
    side = Side(name=str(REFERENCE), outputs=outputs)
    wanted = [Instruction("x", "  What is 12 times 12?\n"), Instruction("y", "Name three primary colors.")]
    got = side_outputs(side, wanted, tmp_path / "outputs_b.jsonl", params=SamplingParams())
    assert [(o.id, o.text, o.n_tokens) for o in got] == [("x", "144.", None),
                                                         ("y", outputs["Name three primary colors."], None)]
    with pytest.raises(InputError, match=r"1 of 2 prompts have no output here .*first missing: 'Unknown\?'"):
        side_outputs(side, [wanted[0], Instruction("z", "Unknown?")], tmp_path / "o.jsonl", params=SamplingParams())
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"instruction": "q", "output": "1"}\n{"instruction": "q", "output": "2"}\n')
    with pytest.raises(InputError, match="a second, different output"):
        load_outputs(clash)


def test_an_outputs_file_srlm_wrote_reads_back_whatever_its_text_holds(tmp_path):
    # srlm writes JSON unescaped: U+2028 and U+0085 inside a response are no line ends, though str.splitlines
    # broke at them ("outputs_a.jsonl:1: invalid JSON: Unterminated string").
    from srlm.h2h import H2HOutput
    from srlm.records import write_jsonl

    texts = ["one\u2028two", "three\x85four\u2029"]
    rows = [H2HOutput(id=f"p{i}", instruction=f"Q{i}?", text=t, generator="m") for i, t in enumerate(texts)]
    write_jsonl(tmp_path / "outputs_a.jsonl", rows)
    assert load_outputs(tmp_path / "outputs_a.jsonl") == {"Q0?": texts[0], "Q1?": texts[1]}
    assert [i.text for i in load_instructions(tmp_path / "outputs_a.jsonl")] == ["Q0?", "Q1?"]


# --- end to end ---------------------------------------------------------------------------------------------

# What the scripted judge does with each instruction, by model: "a" / "b" name that model's response in both
# orders; "first" always names the response shown first (position bias); "tie" says tie; "garbage" never
# says "Winner:"; "half" names A when A is shown first and fails otherwise.
PLAN = {"Tell me about owls.": "a", "Explain rain.": "a", "Describe a cat.": "b", "Name a river.": "first",
        "Count to three.": "tie", "Write a haiku.": "garbage", "Define time.": "half"}


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


class ScriptedJudge:
    """Judges by the plan; tells which shown response is model A's by reading the run's outputs_a.jsonl."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def __call__(self, body: dict) -> str:
        prompt = body["messages"][0]["content"]
        instruction = between(prompt, "[Instruction]\n", "\n\n[Response A]")
        shown_first = between(prompt, "[Response A]\n", "\n[End of Response A]")
        outputs_a = {json.loads(line)["instruction"]: json.loads(line)["text"]
                     for line in (self.out_dir / "outputs_a.jsonl").read_text().splitlines()}
        a_first = shown_first == outputs_a[instruction]
        plan = PLAN[instruction]
        if plan in ("a", "b"):
            return "Winner: " + ("A" if (plan == "a") == a_first else "B")
        return {"first": "Response A is better.\nWinner: A", "tie": "**Winner:** tie", "garbage": "Both fine.",
                "half": "Winner: A" if a_first else "I cannot tell."}[plan]


@pytest.fixture(scope="module")
def other_model(tiny_model, tmp_path_factory):
    """Model B: the tiny model with its weights perturbed, so its responses differ from A's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    out = tmp_path_factory.mktemp("model-b")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


CPU = ["--set", "device=cpu", "--set", "generation.batch_size=4"]


def test_h2h_end_to_end_with_a_judge_behind_an_openai_compatible_server(tiny_model, other_model, tmp_path, capsys,
                                                                        monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "text": text, "iteration": 0, "source": "user"}) + "\n"
                               for i, text in enumerate(PLAN)))
    out = tmp_path / "h2h"
    with OpenAIServer(respond=ScriptedJudge(out)) as server:
        args = ["eval", "h2h", "--a", str(tiny_model), "--b", str(other_model), "--prompts", str(prompts),
                "--judge-url", server.url, "--judge-model", "judge-model", "--out", str(out),
                "--temperature", "1.0", "--max-new-tokens", "8", *CPU]
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert len(server.requests) == 2 * len(PLAN)
        assert {r["model"] for r in server.requests} == {"judge-model"}
        assert {r["temperature"] for r in server.requests} == {0.0}  # the judge is greedy

        outputs_a, outputs_b = read_jsonl(out / "outputs_a.jsonl"), read_jsonl(out / "outputs_b.jsonl")
        assert [o["id"] for o in outputs_a] == [o["id"] for o in outputs_b] == [f"p{i}" for i in range(len(PLAN))]
        assert all(a["text"] != b["text"] for a, b in zip(outputs_a, outputs_b))  # the script needs them apart
        assert all(1 <= o["n_tokens"] <= 8 for o in outputs_a + outputs_b)
        verdicts = read_jsonl(out / "verdicts.jsonl")
        assert len(verdicts) == 14 and {v["order"] for v in verdicts} == {"ab", "ba"}
        by_id = {f"{v['prompt_id']}-{v['order']}": v for v in verdicts}
        assert by_id["p5-ab"]["id"].startswith("p5-ab-")  # and a digest of the texts judged
        assert {k: v for k, v in by_id["p5-ab"].items() if k != "id"} == {
            "prompt_id": "p5", "order": "ab", "text": "Both fine.", "label": None, "winner": None,
            "error": "no 'Winner: A/B/tie' found"}
        assert (by_id["p2-ba"]["label"], by_id["p2-ba"]["winner"]) == ("A", "b")  # B's response shown first, won

        # Judged: p0 win, p1 win, p2 loss, p3 tie (orders disagree), p4 tie; p5 and p6 excluded.
        judged = outputs_a[:5]
        scores = np.array([1, 1, 0, 0.5, 0.5])
        diffs = np.array([len(a["text"].split()) - len(b["text"].split()) for a, b in zip(judged, outputs_b)],
                         dtype=float)
        labels = np.array(["win", "win", "loss", "tie", "tie"], dtype=object)

        def ci(statistic):
            return bootstrap_ci(statistic, 5, resamples=1000, seed=0)

        def mean(values):
            return float(np.mean(values))

        lc, coef = length_controlled_win_rate(scores, diffs)
        expected = {
            "a": str(tiny_model.resolve()), "b": str(other_model.resolve()),
            "judge": f"judge-model at {server.url}",
            "counts": {"win": 2, "tie": 2, "loss": 1},
            "rates": {"win": 0.4, "tie": 0.4, "loss": 0.2},
            "win_rate": 0.6,
            "rates_ci95": {k: ci(lambda idx, k=k: float(np.mean(labels[idx] == k))) for k in ("win", "tie", "loss")},
            "win_rate_ci95": ci(lambda idx: float(scores[idx].mean())),
            "lc_win_rate": lc,
            "lc_win_rate_ci95": ci(lambda idx: (length_controlled_win_rate(scores[idx], diffs[idx]) or (None,))[0]),
            "lc_length_coef": coef,
            "lc_separated": False,
            "prompts": 7, "judged_prompts": 5, "excluded_prompts": 2, "judgments": 14, "parse_failures": 3,
            "order_disagreements": 1,
            # Non-tie labels of the judged prompts: A, B (p0), A, B (p1), B, A (p2), A, A (p3): 5 of 8 name the first
            # shown (p6-ab's "A" is an excluded prompt's).
            "first_position_preference": 5 / 8,
            "length": {side: {"mean_tokens": mean([o["n_tokens"] for o in outs]),
                              "mean_words": mean([len(o["text"].split()) for o in outs]),
                              "mean_chars": mean([len(o["text"]) for o in outs]),
                              "truncated": sum(o["truncated"] for o in outs)}
                       for side, outs in (("a", outputs_a), ("b", outputs_b))},
            "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95},
            "conventions": CONVENTIONS,
        }
        result = json.loads((out / "h2h.json").read_text())
        assert result == json.loads(json.dumps(expected))
        assert "60.0%" in printed and "ties from order disagreement: 1" in printed

        # A rerun finds every file complete: no model is loaded, no judge is asked, the same numbers come out.
        monkeypatch.setattr(cli, "_generator_for", lambda *a: pytest.fail("a model was loaded on a complete rerun"))
        assert main(args) == 0
        assert len(server.requests) == 14
        assert json.loads((out / "h2h.json").read_text()) == result

        # The same directory under other settings would mix two comparisons: refused (exit 5).
        assert main([*args[:-len(CPU)], "--max-new-tokens", "9", *CPU]) == 5
        assert "max_new_tokens: 8 -> 9" in capsys.readouterr().err


def test_h2h_against_reference_outputs_with_model_a_as_judge(tiny_model, tmp_path, capsys):
    # AlpacaEval's layout: the prompts and B's responses come from one model_outputs.json-style array. The tiny
    # random model cannot write "Winner: ...", so every verdict fails, is counted, and no rate is invented.
    out = tmp_path / "h2h"
    assert main(["eval", "h2h", "--a", str(tiny_model), "--b-outputs", str(REFERENCE), "--prompts", str(REFERENCE),
                 "--judge", "self", "--judge-max-new-tokens", "6", "--max-new-tokens", "6", "--out", str(out),
                 "--resamples", "50", *CPU]) == 0
    result = json.loads((out / "h2h.json").read_text())
    assert (result["prompts"], result["judged_prompts"], result["parse_failures"]) == (3, 0, 6)
    assert result["win_rate"] is None and result["lc_win_rate"] is None
    assert result["judge"] == f"self ({tiny_model.resolve()})" and result["b"] == str(REFERENCE)
    assert result["length"]["b"]["mean_tokens"] is None
    outputs_b = read_jsonl(out / "outputs_b.jsonl")
    assert [o["text"] for o in outputs_b] == [r["output"] for r in json.loads(REFERENCE.read_text())]
    assert "0 judged, 3 excluded; 6 of 6 verdicts failed to parse" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--a", "m", "--b", "m"], "no judge: give --judge self"),
    (["--a-outputs", str(REFERENCE), "--b", "m", "--judge", "self"], "--judge self means model A judges"),
    (["--a", "m", "--b", "m", "--judge-url", "http://x/v1"], "--judge-url needs --judge-model NAME"),
    (["--a", "m", "--b", "m", "--judge", "self", "--judge-url", "http://x/v1", "--judge-model", "j"], "not both"),
    (["--a", "m", "--b", "m", "--judge-url", "x/v1", "--judge-model", "j"], "expected an http:// or https:// URL"),
])
def test_h2h_usage_errors(tmp_path, capsys, extra, message):
    assert main(["eval", "h2h", "--prompts", str(REFERENCE), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_h2h_missing_reference_output_exits_4(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "Not in the reference file?"}\n')
    code = main(["eval", "h2h", "--a-outputs", str(REFERENCE), "--b-outputs", str(REFERENCE), "--prompts",
                 str(prompts), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--out",
                 str(tmp_path / "o")])
    assert code == 4 and "1 of 1 prompts have no output here" in capsys.readouterr().err


def test_h2h_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", "h2h", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: srlm eval h2h" in out and "--b-outputs FILE" in out and "--judge-url URL" in out


def test_resumed_verdicts_are_kept_only_for_the_texts_they_judged(tmp_path):
    """outputs.json exported again to the same path, with other texts: the comparison must judge the new texts,
    not hand back the verdicts the old ones got."""
    from srlm.backends import Completion

    class PrefersGood:
        def __init__(self):
            self.requests = 0

        def generate(self, requests, params):
            self.requests += len(requests)
            verdicts = []
            for r in requests:
                shown_first = r[0]["content"].split("[Response A]")[1].split("[End of Response A]")[0]
                verdicts.append("Winner: A" if "GOOD" in shown_first else "Winner: B")
            return [Completion(text=v, n_tokens=2, truncated=False) for v in verdicts]

    def outputs(text):
        return [H2HOutput(id="p0", instruction="Say something.", text=text, generator="x")]

    judge, path = PrefersGood(), tmp_path / "verdicts.jsonl"
    first = judge_pairs(judge, outputs("GOOD"), outputs("meh"), path)
    assert [v.winner for v in first] == ["a", "a"] and judge.requests == 2
    assert judge_pairs(judge, outputs("GOOD"), outputs("meh"), path) == first and judge.requests == 2  # resumed
    again = judge_pairs(judge, outputs("bad"), outputs("GOOD"), path)
    assert [v.winner for v in again] == ["b", "b"] and judge.requests == 4


def test_a_local_judge_trained_again_under_its_path_is_another_judge(other_model, tmp_path, capsys):
    """Verdicts on disk belong to the judge's weights, not its path: a rerun after the judge was retrained in place
    is refused rather than mixing its verdicts with the old judge's."""
    import os
    import shutil

    judge = shutil.copytree(other_model, tmp_path / "judge")
    args = ["eval", "h2h", "--a-outputs", str(REFERENCE), "--b-outputs", str(REFERENCE), "--prompts", str(REFERENCE),
            "--judge", str(judge), "--judge-max-new-tokens", "4", "--out", str(tmp_path / "h2h"), "--resamples", "10",
            *CPU]
    assert main(args) == 0
    assert main(args) == 0  # the same weights: the directory is simply complete
    weights = judge / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(args) == 5
    assert "judge_weights" in capsys.readouterr().err


# --- AlpacaEval's judge prompts (PAPER.md §5: the paper's GPT-4 judge) ---------------------------------------

# The shape of AlpacaEval's alpaca_eval_clf_gpt4_turbo prompt, shortened: ChatML turns, {instruction}, {output_1},
# {output_2}, and the answer 'm' (output_1) or 'M'.
ALPACA_CLF = '''<|im_start|>system
You evaluate and select the best model.
<|im_end|>
<|im_start|>user
## Instruction
{"instruction": """{instruction}""",}
## Model Outputs
{{"model_identifier": "m", "output": """{output_1}"""}, {"model_identifier": "M", "output": """{output_2}"""}}
Answer m or M.
<|im_end|>'''
# alpaca_eval_gpt4's shape: a ranking list of model_1 and model_2.
ALPACA_RANKING = '''<|im_start|>system
You rank models.
<|im_end|>
<|im_start|>user
{"instruction": """{instruction}""",}
[{"model": "model_1", "answer": """{output_1}"""}, {"model": "model_2", "answer": """{output_2}"""}]
Return [{'model': <model-name>, 'rank': <model-rank>}, {'model': <model-name>, 'rank': <model-rank>}]
<|im_end|>'''


@pytest.mark.parametrize("text, label", [("m", "A"), ("M", "B"), (" `M`\n", "B"), ("'m'", "A"),
                                         ("m or M", None), ("model M", None), ("", None)])
def test_alpaca_eval_identifiers(text, label):
    from srlm.h2h import parse_identifier

    assert parse_identifier(text)[0] == label
    assert (parse_identifier(text)[1] is None) == (label is not None)


@pytest.mark.parametrize("text, label", [
    ("[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]", "B"),
    ("Here:\n[\n  {'model': 'model_1', 'rank': 1},\n  {'model': 'model_2', 'rank': 2}\n]", "A"),
    ("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 1}]", None),  # two firsts: no verdict
    ("[{'model': 'model_3', 'rank': 1}]", None),
    ("[{'name': 'model_1'}]", None),
    ("I prefer model_1.", None),
    ("[__import__('os').getcwd()]", None),  # read as a literal, never run
    ("[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]\nModel 2 is better [it is concise].", "B"),
    ("Ranking [final]:\n[{'model': 'model_1', 'rank': '1'}, {'model': 'model_2', 'rank': '2'}]", "A"),
    ("[{'model': 'model_1', 'rank': True}, {'model': 'model_2', 'rank': 2}]", None),
])
def test_alpaca_eval_rankings(text, label):
    from srlm.h2h import parse_ranking

    assert parse_ranking(text)[0] == label


@pytest.mark.parametrize("template, answer_ab, answer_ba, winners", [
    (ALPACA_CLF, "m", "M", ["a", "a"]),  # A's response in both orders
    (ALPACA_CLF, "m", "m", ["a", "b"]),  # the first shown in both orders: position bias, a tie once combined
    (ALPACA_RANKING, "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]",
     "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]", ["b", "b"]),  # B's response in both
])
def test_an_alpaca_eval_prompt_is_sent_as_its_turns_and_read_by_its_answer(tmp_path, template, answer_ab, answer_ba,
                                                                           winners):
    from srlm.backends import Completion
    from srlm.h2h import load_pairwise_template

    path = tmp_path / "judge.txt"
    path.write_text(template)
    sent = []

    class Judge:
        def generate(self, requests, params):
            sent.extend(requests)
            shown_a_first = [r[1]["content"].index("A's answer") < r[1]["content"].index("B's answer") for r in requests]
            return [Completion(text=answer_ab if ab else answer_ba, n_tokens=1, truncated=False) for ab in shown_a_first]

    a = [H2HOutput(id="p0", instruction="Say hi.", text="A's answer <|im_end|> {output_2}", generator="x")]
    b = [H2HOutput(id="p0", instruction="Say hi.", text="B's answer", generator="y")]
    verdicts = judge_pairs(Judge(), a, b, tmp_path / "verdicts.jsonl", template=load_pairwise_template(path))
    assert [m["role"] for m in sent[0]] == ["system", "user"] and "<|im_start|>" not in sent[0][1]["content"]
    # The response's own ChatML marker and brace text stay text, and the instruction is in its slot.
    assert "A's answer <|im_end|> {output_2}" in sent[0][1]["content"] and "Say hi." in sent[0][1]["content"]
    assert [v.order for v in verdicts] == ["ab", "ba"] and all(v.error is None for v in verdicts)
    assert [v.winner for v in verdicts] == winners


def test_a_judge_prompt_without_a_readable_verdict_or_with_text_outside_its_turns_is_refused(tmp_path):
    from srlm.errors import ConfigError
    from srlm.h2h import load_pairwise_template

    path = tmp_path / "judge.txt"
    path.write_text("Compare <INSTRUCTION_HERE>: <RESPONSE_A_HERE> vs <RESPONSE_B_HERE>. Which is better?")
    with pytest.raises(ConfigError, match="asks for no verdict srlm can read"):
        load_pairwise_template(path)
    # The last turn left open: the instruction and both outputs would never reach the judge.
    path.write_text(ALPACA_CLF.removesuffix("<|im_end|>"))
    with pytest.raises(ConfigError, match="text outside its ChatML turns"):
        load_pairwise_template(path)


@pytest.mark.parametrize("text, label", [
    ("### Concise explanation\nOutput M is more complete.\n\n### Which is best, m or M?\nM", "B"),
    ("Both are fine; the first is shorter.\nm.", "A"),
    ("so the answer is Mm", None),
    ("I cannot tell.", None),
])
def test_alpaca_eval_chain_of_thought_answers_end_with_the_identifier(tmp_path, text, label):
    """alpaca_eval_clf_cot_gpt4_turbo asks for an explanation first and reads the answer's last character."""
    from srlm.h2h import _verdict_parser, load_pairwise_template

    path = tmp_path / "cot.txt"
    path.write_text(ALPACA_CLF.replace("Answer m or M.", "Explain, then finish with m or M."))
    assert _verdict_parser(load_pairwise_template(path))(text)[0] == label


def test_the_shipped_alpaca_eval_prompts_load(tmp_path):
    from srlm.h2h import load_pairwise_template, template_turns

    shipped = Path(__file__).parents[2] / "shared/data/alpaca-eval"
    if not shipped.exists():
        pytest.skip("../shared/data is not here (the data is not part of the project)")
    for name in ("judge_prompt__alpaca_eval_clf_gpt4_turbo.txt", "judge_prompt__alpaca_eval_gpt4.txt"):
        turns = template_turns(load_pairwise_template(shipped / name))
        assert [role for role, _ in turns] == ["system", "user"]
        assert all(slot in turns[1][1] for slot in ("<INSTRUCTION_HERE>", "<RESPONSE_A_HERE>", "<RESPONSE_B_HERE>"))


def test_a_standalone_comparison_caps_responses_as_the_run_evaluates(tmp_path):
    # `srlm eval h2h` capped responses at candidates.max_new_tokens (128 in tiny then) where `srlm run` uses
    # eval.h2h_max_new_tokens: win rates of the two paths could not be compared.
    from srlm.config import load_config

    out = tmp_path / "h2h"
    main(["eval", "h2h", "--a-outputs", str(REFERENCE), "--b-outputs", str(REFERENCE), "--prompts", str(REFERENCE),
          "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--set", "generation.max_retries=0",
          "--out", str(out)])
    expected = load_config().eval.h2h_max_new_tokens
    assert json.loads((out / "settings.json").read_text())["max_new_tokens"] == expected != load_config().candidates.max_new_tokens

