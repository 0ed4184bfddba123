"""`srlm data import`: every format on a small invented fixture, every kind of bad input, and ranked -> EFT."""
import json
import re
from collections import Counter

import pytest

from conftest import FIXTURES, tiny_config
from srlm.backends import Completion, make_generator
from srlm.cli import main
from srlm.errors import InputError, SrlmError
from srlm.evaluation import RankedReply, load_ranked
from srlm.importers import (
    DISAGREE,
    HUMAN_TIES,
    JUDGE_TIE,
    NO_PARSED,
    PICKED_DISAGREE,
    TOO_FEW,
    eft_judgment,
    flatten_cap,
    import_file,
    import_hf,
    import_ranked,
    import_rows,
    ranking_verdict,
    read_alpaca,
    read_chat,
    read_dolly,
    read_oasst,
    read_self_instruct,
    read_sharegpt,
    select_eft,
)
from srlm.judging import judge_options, parse_score
from srlm.records import EFTExample, IFTExample, Judgment, Prompt, read_jsonl, write_jsonl
from srlm.validate import validate

DATA = FIXTURES / "importers"


def ids(records):
    return [r.id for r in records]


# ---------------------------------------------------------------------------------------------- readers


def test_oasst_tree_export_keeps_first_turn_english_rank_0_replies():
    records, report = read_oasst(DATA / "oasst_trees.jsonl", "ift")
    assert records == [
        IFTExample(id="oasst-a1", prompt="How long should I boil an egg for a firm yolk?",
                   response="About nine minutes in gently boiling water, then cool it in cold water."),
        IFTExample(id="oasst-a8", prompt="Write a haiku about rain.",
                   response="Soft rain on the roof\ncounting the hours for me\nuntil the sun wakes"),
    ]
    assert (report.unit, report.read, report.kept) == ("assistant replies", 10, 2)
    assert report.dropped == Counter({"not rank 0": 2, "not first turn": 1, "not English": 1, "failed review": 1,
                                      "deleted": 1, "duplicate prompt": 1, "empty response": 1})


def test_oasst_tree_export_to_prompts_keeps_root_prompts():
    records, report = read_oasst(DATA / "oasst_trees.jsonl", "prompts")
    assert ids(records) == ["oasst-p1", "oasst-p3", "oasst-p5", "oasst-p6"]
    assert all(r.source == "user" and r.iteration == 0 for r in records)
    assert report.dropped == Counter({"not first turn": 1, "not English": 1, "duplicate prompt": 1})


def test_oasst_flat_message_export():
    records, report = read_oasst(DATA / "oasst_messages.jsonl", "ift")
    assert records == [IFTExample(id="oasst-m2", prompt="Give me a synonym for happy.", response="Joyful.")]
    assert report.dropped == Counter({"not rank 0": 1, "prompt deleted": 1, "its prompt is not in the file": 1,
                                      "not English": 1})
    records, report = read_oasst(DATA / "oasst_messages.jsonl", "prompts")
    assert ids(records) == ["oasst-m1"] and report.dropped == Counter({"deleted": 1, "not English": 1})


def test_oasst_language_is_configurable():
    records, _ = read_oasst(DATA / "oasst_messages.jsonl", "ift", lang=None)
    assert ids(records) == ["oasst-m2", "oasst-m8"]
    records, report = read_oasst(DATA / "oasst_trees.jsonl", "prompts", lang="de")
    assert [r.text for r in records] == ["Wie viele Beine hat eine Spinne?"]
    assert report.dropped["language is not de"] == 5


def test_alpaca_joins_instruction_and_input():
    records, report = read_alpaca(DATA / "alpaca.json", "ift")
    assert records == [
        IFTExample(id="alpaca-0", prompt="Give three tips for staying focused.",
                   response="Silence notifications, work in short blocks, and take real breaks."),
        IFTExample(id="alpaca-1", prompt="Translate the sentence into French.\n\nThe cat sleeps.",
                   response="Le chat dort."),
    ]
    assert (report.read, report.kept, report.dropped) == (4, 2, Counter({"empty response": 1, "duplicate prompt": 1}))
    records, report = read_alpaca(DATA / "alpaca.json", "prompts")
    assert ids(records) == ["alpaca-0", "alpaca-1", "alpaca-2"] and report.dropped == Counter({"duplicate prompt": 1})


def test_alpaca_also_reads_jsonl(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi."}\n')
    assert read_alpaca(path)[0] == [IFTExample(id="alpaca-1", prompt="Say hi.", response="Hi.")]


def test_dolly_keeps_context_and_category():
    records, report = read_dolly(DATA / "dolly.jsonl", "ift")
    assert records == [
        IFTExample(id="dolly-1", prompt="Who wrote the novel in the passage?\n\nQuiet Harbour is a novel by the "
                   "invented author Mara Lind, published in 1990.", response="Mara Lind.", category="closed_qa"),
        IFTExample(id="dolly-2", prompt="List two uses of a paperclip.",
                   response="Holding sheets of paper together and pressing tiny reset buttons.",
                   category="brainstorming"),
    ]
    # Line 3 differs only in case and spacing: the same prompt for `srlm data validate`, so dropped here too.
    assert report.dropped == Counter({"duplicate prompt": 1})


def test_sharegpt_ids_of_rows_without_one_never_meet_the_ids_rows_give(tmp_path):
    path = tmp_path / "chats.jsonl"
    turns = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "ok"}]
    path.write_text(json.dumps({"id": "2", "conversations": turns("First?")}) + "\n"
                    + json.dumps({"conversations": turns("Second?")}) + "\n")
    records, _ = read_sharegpt(path, "ift")
    assert [r.id for r in records] == ["sharegpt-2", "sharegpt-line2"]


def test_sharegpt_first_human_turn_and_its_reply():
    records, report = read_sharegpt(DATA / "sharegpt.json", "ift")
    assert records == [IFTExample(id="sharegpt-c1", prompt="What is 7 times 6?", response="42."),
                       IFTExample(id="sharegpt-4", prompt="Spell 'cat' backwards.", response="tac")]
    assert report.dropped == Counter({"does not start with a human turn": 1, "no gpt reply to the first human turn": 1})
    assert report.left_out == Counter({"leading system turns": 1})
    records, _ = read_sharegpt(DATA / "sharegpt.json", "prompts")
    assert [r.text for r in records] == ["What is 7 times 6?", "Name a river in Africa.", "Spell 'cat' backwards."]


def test_chat_first_user_turn_and_assistant_reply():
    records, report = read_chat(DATA / "chat.jsonl", "ift")
    assert records == [IFTExample(id="chat-1", prompt="What colour is the sky on a clear day?", response="Blue."),
                       IFTExample(id="chat-2", prompt="Suggest a title for a story about a lighthouse.",
                                  response="The Last Keeper")]
    # Row 3's assistant only calls a tool (content null): no text to learn.
    assert report.dropped == Counter({"empty response": 1, "does not start with a user message": 1})
    assert report.left_out == Counter({"leading system messages": 1})
    records, _ = read_chat(DATA / "chat.jsonl", "prompts")
    assert ids(records) == ["chat-1", "chat-2", "chat-3"]


def test_chat_rows_with_more_than_text_are_dropped(tmp_path):
    # The image part used to be dropped and its text kept: an answer about a picture the model never sees.
    image = {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [
        [{"role": "user", "content": [image, {"type": "text", "text": "What is in this picture?"}]},
         {"role": "assistant", "content": "A cat."}],
        [{"role": "user", "content": "Say it aloud."},
         {"role": "assistant", "content": [{"type": "input_audio", "input_audio": {}}, {"type": "text", "text": "Hi"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}, {"role": "assistant", "content": "Red."}],
    ]))
    records, report = read_chat(path, "ift")
    assert records == [IFTExample(id="chat-3", prompt="Name a colour.", response="Red.")]
    assert report.dropped == Counter({"content other than text (an image, audio, a file)": 2})
    records, report = read_chat(path, "prompts")  # a prompt is the user's turn alone
    assert ids(records) == ["chat-2", "chat-3"] and sum(report.dropped.values()) == 1


def test_self_instruct_seed_tasks():
    records, report = read_self_instruct(DATA / "self_instruct.jsonl", "prompts")
    assert records == [
        Prompt(id="self-instruct-seed_task_a", text="Make a packing list for a weekend hike.", iteration=0,
               source="user"),
        Prompt(id="self-instruct-seed_task_b", text="Is the sentiment of the review positive or negative?\n\n"
               "Review: The soup was cold and bland.", iteration=0, source="user"),
        Prompt(id="self-instruct-seed_task_c", text="Describe a sunset to someone who has never seen one.",
               iteration=0, source="user"),
    ]
    assert report.dropped == Counter()
    records, report = read_self_instruct(DATA / "self_instruct.jsonl", "ift")
    assert [r.response for r in records] == ["Water, a map, a rain jacket, snacks and a first-aid kit.", "Negative"]
    assert report.dropped == Counter({"no instance (no output to learn)": 1})


def test_limit_keeps_the_first_records():
    records, report = import_file("alpaca", DATA / "alpaca.json", "prompts", limit=1)
    assert ids(records) == ["alpaca-0"]
    assert report.dropped == Counter({"over --max-prompts": 2, "duplicate prompt": 1})


def test_rows_already_parsed_go_through_the_same_converter():
    rows = [{"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}]
    records, _ = import_rows("dolly", rows, "ift", source="hf:someone/dolly[train]")
    assert records == [IFTExample(id="dolly-0", prompt="Say hi.", response="Hi.", category="open_qa")]
    with pytest.raises(InputError, match=r"hf:someone/dolly\[train\], row 0: field 'response': missing"):
        import_rows("dolly", [{"instruction": "Say hi."}], "ift", source="hf:someone/dolly[train]")


def test_hf_needs_allow_online():
    with pytest.raises(SrlmError, match="add --allow-online"):
        import_hf("alpaca", "someone/some-data", "ift")


@pytest.mark.parametrize("fmt,to", [("alpaca", "eft"), ("ranked", "ift"), ("oasst", "eft")])
def test_combinations_without_meaning_are_refused(fmt, to):
    with pytest.raises(SrlmError, match="Supported: oasst -> ift or prompts; .* ranked -> eft"):
        import_file(fmt, DATA / "alpaca.json", to)


# ---------------------------------------------------------------------------------------------- bad input


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def lines(*objects):
    return "".join(json.dumps(o) + "\n" for o in objects)


DOLLY = {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"}


@pytest.mark.parametrize("fmt,name,content,where", [
    # missing field, wrong type: JSONL names the line, a JSON array the element
    ("dolly", "d.jsonl", lines(DOLLY, {"instruction": "Q", "context": ""}), ":2: field 'response': missing"),
    ("dolly", "d.jsonl", lines({**DOLLY, "response": 5}), ":1: field 'response': Input should be a valid string"),
    ("alpaca", "a.json", json.dumps([{"instruction": "Q", "output": "A"}, {"instruction": "Q2"}]),
     ", element 1: field 'output': missing"),
    ("alpaca", "a.json", json.dumps([{"instruction": ["Q"], "output": "A"}]),
     ", element 0: field 'instruction': Input should be a valid string"),
    ("alpaca", "a.json", json.dumps([{"instruction": "Q", "output": "A"}, "just text"]),
     ", element 1: expected a JSON object, found str"),
    ("sharegpt", "s.json", json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]),
     ", element 0: field 'conversations.0.from': Input should be"),
    ("chat", "c.jsonl", lines({"messages": [{"role": "user", "content": "Q"}]}, {"messages": "Q"}),
     ":2: field 'messages': Input should be a valid list"),
    ("self-instruct", "t.jsonl", lines({"id": "t1", "instruction": "Q", "instances": [{"input": ""}]}),
     ":1: field 'instances.0.output': missing"),
    ("oasst", "o.jsonl", lines({"message_tree_id": "t", "prompt": {"message_id": "p", "role": "prompter",
                                                                   "text": "Q", "replies": [{"role": "assistant"}]}}),
     ":1: field 'prompt.replies.0.message_id': missing"),
    ("oasst", "o.jsonl", lines({"message_id": "m", "role": "prompter", "text": "Q"}), ":1: field 'parent_id': missing"),
    # empty files
    ("dolly", "d.jsonl", "\n\n", ": file is empty"),
    ("alpaca", "a.json", "[]", ": file is empty"),
    ("alpaca", "a.json", "", ": file is empty"),
    # invalid UTF-8
    ("dolly", "d.jsonl", lines(DOLLY).encode() + b'{"instruction": "\xff"}\n', ":2: invalid UTF-8"),
    ("alpaca", "a.json", b'[\n{"instruction": "Q", "output": "A"},\n{"instruction": "\xff", "output": "A"}]',
     ":3: invalid UTF-8"),
    # invalid JSON, truncated
    ("chat", "c.jsonl", lines({"messages": []}) + '{"messages": [', ":2: invalid JSON: Expecting value at column 15 "
                                                                  "(the line looks truncated)"),
    ("chat", "c.jsonl", '{"messages": []}\n{"messages": [}]\n', ":2: invalid JSON"),
    ("alpaca", "a.json", '[\n{"instruction": "Q", "output": "A"},\n{"instruction": "Q2", ',
     ":3: invalid JSON: Expecting property name enclosed in double quotes at column 23 (the file looks truncated)"),
    # JSON Python's reader refuses, and valid JSON that is no text, in an array: errors naming the line
    ("alpaca", "a.json", "[" * 100_000 + "]" * 100_000, ":1: JSON this reader refuses"),
    ("alpaca", "a.json", '[\n{"instruction": "Q", "output": "A"},\n{"instruction": "\\ud800", "output": "A"}]',
     ":3: an escaped lone surrogate"),
    # duplicate ids, where the format has ids
    ("sharegpt", "s.jsonl", lines({"id": "x", "conversations": []}, {"id": "x", "conversations": []}),
     ":2: field 'id': duplicate id 'x' (first at line 1)"),
    ("self-instruct", "t.jsonl", lines({"id": 3, "instruction": "Q"}, {"id": 3, "instruction": "R"}),
     ":2: field 'id': duplicate id '3' (first at line 1)"),
    ("oasst", "o.jsonl", lines({"message_id": "m", "parent_id": None, "role": "prompter", "text": "Q"},
                               {"message_id": "m", "parent_id": None, "role": "prompter", "text": "R"}),
     ":2: field 'message_id': duplicate message_id 'm'"),
    # a JSON array where JSONL is expected, and one JSON document where JSONL is expected
    ("dolly", "d.json", json.dumps([DOLLY]), ": is a JSON array, but dolly files are JSONL"),
    ("dolly", "d.json", json.dumps({"rows": [DOLLY]}, indent=2),
     ":1: one JSON object over several lines, but dolly expects JSONL (one object per line); if the rows are under "
     "'rows'"),
])
def test_bad_input_names_file_line_and_field(tmp_path, fmt, name, content, where):
    path = write(tmp_path, name, content)
    with pytest.raises(InputError) as error:
        import_file(fmt, path, "ift")
    assert str(error.value).startswith(f"{path}{where}"), str(error.value)


TIPS = {"instruction": "Give three tips for staying focused.", "input": "", "output": "Plan, rest, single-task."}


@pytest.mark.parametrize("name,content", [
    ("a.json", json.dumps([TIPS], indent=2)),  # the byte-order mark hid the "[": read as JSONL, refused
    ("a.jsonl", json.dumps(TIPS) + "\n"),
])
def test_a_file_may_begin_with_a_byte_order_mark(tmp_path, name, content):
    records, report = import_file("alpaca", write(tmp_path, name, b"\xef\xbb\xbf" + content.encode()), "ift")
    assert [r.prompt for r in records] == [TIPS["instruction"]] and report.kept == 1


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        import_file("alpaca", tmp_path / "nope.json", "ift")


# ---------------------------------------------------------------------------------------------- ranked -> EFT


def test_ranking_verdict():
    assert ranking_verdict([1.0, 0.5, 0.0], [5, 3, 1]) is None
    assert ranking_verdict([1.0, 0.5, 0.0], [5, 1, 3]) == DISAGREE
    assert ranking_verdict([1.0, 0.5, 0.0], [5, 3, 3]) == JUDGE_TIE
    assert ranking_verdict([1.0, 0.5, 0.5], [5, 2, 3]) is None  # a pair humans tie constrains nothing
    assert ranking_verdict([0.5, 0.5], [5, 2]) == HUMAN_TIES
    assert ranking_verdict([0.5], [5]) == TOO_FEW


def test_eft_judgment_ends_in_exactly_score_n():
    assert eft_judgment("Good.\n**Total score:** 4 points, well done.", 4) == "Good.\nScore: 4"
    assert eft_judgment("It is a total\nScore: 3", 3) == "It is a total\nScore: 3"
    assert eft_judgment("Score: 2", 2) == "Score: 2"
    assert eft_judgment("Helpful. Score: four", 4) == "Helpful.\nScore: 4"


@pytest.mark.parametrize("counts,cap", [([10, 2, 2, 2, 2], 3), ([5, 5, 5, 5], 5), ([1, 1, 1], 1), ([0, 3], 3),
                                        ([], 0), ([40, 30, 20, 10, 5, 1], 27)])  # 27 of 90 is exactly 30%
def test_flatten_cap(counts, cap):
    assert flatten_cap(counts) == cap


def ranked(prompt_id, human):
    return [RankedReply(id=f"{prompt_id}-{i}", prompt_id=prompt_id, prompt=f"Question {prompt_id}?",
                        reply=f"Reply {i} to {prompt_id}.", human_score=h) for i, h in enumerate(human)]


def judged(reply_id, *scores, prompt_id=None):
    return [Judgment(id=f"{reply_id}-j{s}", candidate_id=reply_id, prompt_id=prompt_id or reply_id.rsplit("-", 1)[0],
                     sample=s, text=f"Reason {s}.\nScore: {v}" if v is not None else "no idea",
                     score=v, error=None if v is not None else "no 'Score: N' found")
            for s, v in enumerate(scores)]


def test_select_eft_keeps_agreeing_prompts_and_picks_the_judgment_nearest_the_mean():
    replies = ranked("a", [1.0, 0.0]) + ranked("b", [1.0, 0.0]) + ranked("c", [1.0, 0.0]) + ranked("d", [0.9, 0.1])
    judgments = (judged("a-0", 3, 5, 4) + judged("a-1", 2, 5)  # means 4 and 3.5: agree
                 + judged("b-0", 1, 1) + judged("b-1", 4, 4)  # disagree
                 + judged("c-0", 4, None) + judged("c-1", None, None)  # c-1 never parsed
                 + judged("d-0", 3) + judged("d-1", 3))  # judge tie
    examples, report = select_eft(replies, judgments)
    # a-0: mean 4, the 4 is sample 2. a-1: mean 3.5, the 2 and the 5 are as near; the lower sample wins.
    assert examples == [
        EFTExample(id="ranked-a-0", prompt="Question a?", response="Reply 0 to a.", judgment="Reason 2.\nScore: 4",
                   score=4),
        EFTExample(id="ranked-a-1", prompt="Question a?", response="Reply 1 to a.", judgment="Reason 0.\nScore: 2",
                   score=2),
    ]
    assert (report.read, report.kept) == (4, 1)
    assert report.dropped == Counter({DISAGREE: 1, NO_PARSED: 1, JUDGE_TIE: 1})
    assert report.details["scores before"] == {2: 1, 4: 1}
    # Two scores, one example each: no cap keeps either under 30%, and the report says so rather than claim it.
    assert report.details["examples after flattening (at most 1 per score; 2 scores present, so one holds 50%, over "
                          "30%)"] == 2


def test_select_eft_drops_a_prompt_whose_picked_judgments_do_not_agree():
    # Means 4 and 3.67 agree with the humans, but each example is one judgment: 4 and 4 would teach a tie, and
    # 4 (of 4, 4, 5) against 5 (of 5, 5, 2) the reverse order.
    replies = ranked("tie", [1.0, 0.0]) + ranked("rev", [1.0, 0.0]) + ranked("ok", [1.0, 0.0])
    judgments = (judged("tie-0", 4, 4, 4) + judged("tie-1", 4, 4, 3) + judged("rev-0", 4, 4, 5)
                 + judged("rev-1", 5, 5, 2) + judged("ok-0", 5, 4, 5) + judged("ok-1", 2, 3, 2))
    examples, report = select_eft(replies, judgments)
    assert ids(examples) == ["ranked-ok-0", "ranked-ok-1"] and [e.score for e in examples] == [5, 2]
    assert (report.read, report.kept) == (3, 1) and report.dropped == Counter({PICKED_DISAGREE: 2})


def test_select_eft_counts_replies_that_repeat_another():
    replies = ranked("a", [1.0, 0.5, 0.0])
    replies[1] = replies[1].model_copy(update={"reply": replies[0].reply.upper()})
    examples, report = select_eft(replies, judged("a-0", 5) + judged("a-1", 4) + judged("a-2", 1))
    assert ids(examples) == ["ranked-a-0", "ranked-a-2"]
    assert report.details["replies repeating another reply's text"] == 1


def test_select_eft_flattens_the_score_distribution_deterministically(tmp_path):
    # 20 agreeing prompts: the better reply always gets a 4 (the paper's "too many 4s"), the worse one 0-3.
    replies, judgments = [], []
    for n in range(20):
        replies += ranked(f"p{n}", [1.0, 0.0])
        judgments += judged(f"p{n}-0", 4) + judged(f"p{n}-1", n % 4)
    examples, report = select_eft(replies, judgments, seed=1)
    assert report.kept == 20 and report.details["scores before"] == {0: 5, 1: 5, 2: 5, 3: 5, 4: 20}
    assert report.details["examples after flattening (at most 8 per score; none over 30%)"] == 28
    # The largest cap that leaves no score over 30%: 8 (8/28 = 29%; 9 would give 9/29 = 31%).
    assert report.details["scores after"] == {0: 5, 1: 5, 2: 5, 3: 5, 4: 8}
    assert max(Counter(e.score for e in examples).values()) / len(examples) <= 0.3
    again, _ = select_eft(replies, judgments, seed=1)
    other, _ = select_eft(replies, judgments, seed=2)
    assert ids(again) == ids(examples) and ids(other) != ids(examples)
    path = tmp_path / "eft.jsonl"
    write_jsonl(path, examples)
    checked = validate(eft=path)
    assert checked.ok and not any("of the set" in w for w in checked.warnings)  # no skew warning


def test_select_eft_ignores_judgments_of_other_replies():
    examples, report = select_eft(ranked("a", [1.0, 0.0]), judged("a-0", 5) + judged("a-1", 1) + judged("z-0", 3))
    assert ids(examples) == ["ranked-a-0", "ranked-a-1"] and report.kept == 1


class ScriptedJudge:
    """A judge that gives each reply a fixed score, to check the whole import without a model."""

    def __init__(self, scores):
        self.scores, self.calls = scores, 0

    def generate(self, requests, params):
        self.calls += len(requests)
        out = []
        for request in requests:
            reply = re.search(r"<response>(.*)</response>", request[0]["content"], re.S).group(1)
            out.append(Completion(text=f"Weighed it.\n**Score:** {self.scores[reply]}", n_tokens=6, truncated=False))
        return out


SCRIPT = {"About nine minutes for a firm yolk.": 5, "A while.": 3, "Eggs are birds.": 1,
          "Steep the leaves in water just below boiling for two minutes.": 2, "Boil it hard for ten minutes.": 4,
          "Air scatters blue light between you and the hills.": 4, "Because of the sky.": 1,
          "Jupiter.": 5, "The Moon.": 0}


def test_import_ranked_judges_the_train_split_and_resumes(tmp_path):
    replies = load_ranked(DATA / "ranked.jsonl", "train")  # q-planet is held out for `srlm eval judge`
    side = tmp_path / "eft.judgments.jsonl"
    generator = ScriptedJudge(SCRIPT)
    examples, report = import_ranked(generator, replies, side, k=2, max_share=1.0)  # no flattening here
    assert generator.calls == 2 * 7 and len(read_jsonl(side, Judgment)) == 14
    assert (report.read, report.kept, report.dropped) == (3, 2, Counter({DISAGREE: 1}))
    assert [(e.id, e.score, e.judgment) for e in examples] == [
        ("ranked-q-boil-r0", 5, "Weighed it.\nScore: 5"), ("ranked-q-boil-r1", 3, "Weighed it.\nScore: 3"),
        ("ranked-q-boil-r2", 1, "Weighed it.\nScore: 1"), ("ranked-q-hill-r0", 4, "Weighed it.\nScore: 4"),
        ("ranked-q-hill-r1", 1, "Weighed it.\nScore: 1")]

    class NoModel:
        def generate(self, requests, params):
            raise AssertionError("every judgment is on disk already")

    again, _ = import_ranked(NoModel(), replies, side, k=2, max_share=1.0)
    assert again == examples
    # A bounded rerun judges only its first prompt's replies and uses only theirs.
    few, report = import_ranked(NoModel(), replies, side, k=2, max_share=1.0, max_prompts=1)
    assert ids(few) == ["ranked-q-boil-r0", "ranked-q-boil-r1", "ranked-q-boil-r2"] and report.read == 1


def test_import_ranked_on_the_tiny_model(tiny_model, tmp_path):
    config = tiny_config(tiny_model)
    replies = load_ranked(DATA / "ranked.jsonl", "all")
    side = tmp_path / "eft.judgments.jsonl"
    examples, report = import_ranked(make_generator(config, tiny_model), replies, side, seed=config.seed,
                                     **judge_options(config))
    judgments = read_jsonl(side, Judgment)
    assert len(judgments) == config.judge.k * len(replies) == 18
    assert {j.candidate_id for j in judgments} == {r.id for r in replies}
    assert report.read == 4 and report.kept + sum(report.dropped.values()) == 4
    for e in examples:  # whatever the random model wrote, what is kept is well-formed EFT
        assert e.judgment.endswith(f"\nScore: {e.score}") or e.judgment == f"Score: {e.score}"
        assert parse_score(e.judgment) == (e.score, None)


# ---------------------------------------------------------------------------------------------- command line


def test_cli_imports_alpaca_to_ift(tmp_path, capsys):
    out = tmp_path / "ift.jsonl"
    assert main(["data", "import", "--from", "alpaca", str(DATA / "alpaca.json"), "--to", "ift", str(out)]) == 0
    assert ids(read_jsonl(out, IFTExample)) == ["alpaca-0", "alpaca-1"]
    captured = capsys.readouterr()
    assert "read 4 rows, kept 2, dropped 2" in captured.err and "1 duplicate prompt" in captured.err
    assert f"2 records (ift) -> {out}" in captured.out
    assert validate(ift=out).ok


def test_cli_imports_oasst_prompts(tmp_path):
    out = tmp_path / "prompts.jsonl"
    assert main(["data", "import", "--from", "oasst", str(DATA / "oasst_trees.jsonl"), "--to", "prompts", str(out),
                 "--max-prompts", "2"]) == 0
    assert ids(read_jsonl(out, Prompt)) == ["oasst-p1", "oasst-p3"]


def test_cli_bad_input_exits_4(tmp_path, capsys):
    bad = write(tmp_path, "d.jsonl", lines(DOLLY, {**DOLLY, "context": 3}))
    assert main(["data", "import", "--from", "dolly", str(bad), "--to", "ift", str(tmp_path / "o.jsonl")]) == 4
    assert f"{bad}:2: field 'context'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_nothing_kept_exits_4_and_writes_nothing(tmp_path, capsys):
    src = write(tmp_path, "d.jsonl", lines({**DOLLY, "response": " "}))
    assert main(["data", "import", "--from", "dolly", str(src), "--to", "ift", str(tmp_path / "o.jsonl")]) == 4
    assert "every one of the 1 rows was dropped" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("args,message", [
    (["--from", "alpaca", "SRC", "--to", "eft", "o.jsonl"], "Supported: oasst -> ift or prompts"),
    (["--from", "alpaca", "SRC", "--to", "sft", "o.jsonl"], "must be one of ift, eft, prompts"),
    (["--from", "alpaca", "--hf", "someone/data", "--to", "ift", "o.jsonl"], "add --allow-online"),
    (["--from", "alpaca", "--to", "ift", "o.jsonl"], "give the input either as SRC"),
    (["--from", "ranked", "SRC", "--to", "eft", "o.jsonl"], "--from ranked needs --model"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, args, message):
    args = [str(DATA / "alpaca.json") if a == "SRC" else str(tmp_path / a) if a == "o.jsonl" else a for a in args]
    assert main(["data", "import", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_ranked_to_eft(tiny_model, tmp_path, capsys, monkeypatch):
    import srlm.cli

    monkeypatch.setattr(srlm.cli, "_generator", lambda args, config: ScriptedJudge(SCRIPT))
    out = tmp_path / "eft.jsonl"
    argv = ["data", "import", "--from", "ranked", str(DATA / "ranked.jsonl"), "--to", "eft", str(out),
            "--model", str(tiny_model), "--set", "judge.k=2", "--set", "generation.batch_size=8"]
    assert main(argv) == 0
    assert len(read_jsonl(tmp_path / "eft.judgments.jsonl", Judgment)) == 14
    # Scores 5, 3, 1 (q-boil) and 4, 1 (q-hill): the two 1s would be 40% of the set, so one goes.
    assert sorted(e.score for e in read_jsonl(out, EFTExample)) == [1, 3, 4, 5]
    err = capsys.readouterr().err
    assert "read 3 prompts, kept 2, dropped 1" in err and "scores after: {1: 1, 3: 1, 4: 1, 5: 1}" in err
    assert validate(eft=out).ok
    # A rerun reuses the judgments only under the same judge: with k=3 they were passed off as the new setting's.
    assert main(argv) == 0 and "reusing the judgments already in" in capsys.readouterr().err
    assert main([*argv, "--set", "judge.k=3"]) == 5
    assert "judge.k: 2 -> 3" in capsys.readouterr().err


def test_cli_help_lists_every_format(capsys):
    with pytest.raises(SystemExit) as done:
        main(["data", "import", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("oasst", "alpaca", "dolly", "sharegpt", "chat", "self-instruct", "ranked"))
