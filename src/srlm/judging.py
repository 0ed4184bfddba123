"""LLM-as-a-Judge: the paper's additive 5-point prompt, score parsing, and the judging stage.

PAPER.md §3 gives the prompt; §4.3 says each candidate is judged k=3 times with sampling and the parsed
scores are averaged; §7 says what goes wrong: a judgment that cannot be parsed is a failure, counted and
reported, and never turned into a score (re-implementations that map failures to 0 teach the model that
whatever confused the judge is "rejected").
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .backends import Generator, SamplingParams, batch_params, plan_batches
from .errors import ConfigError, JudgeIntegrityError
from .records import Candidate, Judgment, Prompt, RecordLog

INSTRUCTION_SLOT = "<INSTRUCTION_HERE>"
RESPONSE_SLOT = "<RESPONSE_HERE>"

# PAPER.md §3 (paper Figure 2), verbatim.
PAPER_TEMPLATE = """Review the user's question and the corresponding response using the additive 5-point
scoring system described below. Points are accumulated based on the satisfaction of each
criterion:
- Add 1 point if the response is relevant and provides some information related to
the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,
addressing the user's question directly and comprehensively, and is well-organized and
helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer.

User: <INSTRUCTION_HERE>
<response><RESPONSE_HERE></response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as
necessary. To evaluate the response in alignment with this additive scoring model, we'll
systematically attribute points based on the outlined criteria."""

MAX_SCORE = 5.0


def score_bin(score: float) -> str:
    """The whole score 0-5 a score counts as in a histogram: the nearest, halves up (a 4.5 counts as a 5; an
    `expected` judge's 2.78 as a 3), so every histogram has the same six bins, whatever the judge mode."""
    return str(min(int(MAX_SCORE), int(score + 0.5)))


def read_template(path: Path, slots: Sequence[str], what: str, where: str) -> str:
    """A user's judge prompt, refused (ConfigError) unless readable and holding every slot: `what` names the
    prompt, `where` what the slots are for, in the message."""
    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what}: {e}")
    missing = [slot for slot in slots if slot not in template]
    if missing:
        raise ConfigError(f"{path}: {what} lacks {' and '.join(missing)} (where {where} go)")
    return template


# The slots as other copies of the paper's prompt write them (oasst2-srlm's llm_as_a_judge_prompt_orig.txt).
BRACE_SLOTS = {"{prompt}": INSTRUCTION_SLOT, "{response}": RESPONSE_SLOT}


def read_slotted_template(path: Path, slots: Sequence[str], braces: dict[str, str], what: str, where: str) -> str:
    """`read_template`, or, for a file that writes its slots as `braces` (other projects' copies of a prompt) and
    none of srlm's, the file with those braces, and only those, turned into srlm's slots."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""  # read_template names the problem
    if not any(slot in text for slot in slots) and all(brace in text for brace in braces):
        return fill_slots(text, braces)
    return read_template(path, slots, what, where)


def load_template(path: Path | None) -> str:
    """The judge prompt: the paper's, or the file's, with its slots as <INSTRUCTION_HERE> and <RESPONSE_HERE> (a file
    may write them {prompt} and {response} instead, and then only those braces are slots)."""
    if path is None:
        return PAPER_TEMPLATE
    return read_slotted_template(path, (INSTRUCTION_SLOT, RESPONSE_SLOT), BRACE_SLOTS, "judge prompt (judge.template)",
                                 "the prompt and the response")


def fill_slots(template: str, values: dict[str, str]) -> str:
    """The template with each slot replaced by its value, in one pass: a slot's name inside a prompt or a response
    is left as it is (replacing slot after slot would fill it too), and so are braces (code, JSON), which
    str.format would read."""
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m.group()], template)


def fill(template: str, prompt: str, response: str) -> str:
    return fill_slots(template, {INSTRUCTION_SLOT: prompt, RESPONSE_SLOT: response})


def judge_request(template: str, prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": fill(template, prompt, response)}]


_NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_NUMBER = r"(?:\d+(?:\.\d+)?|zero|one|two|three|four|five)\b"
# "Score: 4", "**Score:** 4", "score = 4.5", "Score: 4/5", "Total score: 3 points", "Score: four", "Score: <4>" (the
# prompt's own "Score: <total points>" filled in); not "subscore: 1".
# A range or a choice ("Score: 3-4", "3 or 4", "4,5", "2, 3") is matched whole, to be refused: it is not one score.
# The additive rubric invites a sum ("Score: 1 + 1 + 1 = 3"): its total is the score, read only if it is the sum.
SCORE_PATTERN = re.compile(
    rf"\bscore[*_\s]*[:=][*_\s]*(?P<open>[<\[(])?(?P<value>{_NUMBER})(?(open)[>\])])"
    rf"(?:(?P<sum>(?:\s*\+\s*{_NUMBER})+)(?:[*_\s]*=[*_\s]*(?P<total>{_NUMBER}))?)?"
    # "2, 3" ends the line or sentence; "3, 2 points were deducted" is a score and a remark.
    rf"(?P<range>\s*(?:-|–|to\b|or\b)\s*{_NUMBER}|\s*,\s*{_NUMBER}(?=[*_\s]*(?:[.;)]|\n|\Z)))?"
    r"(?:\s*(?P<paren>\()?\s*(?:/|out\s+of)\s*(?P<scale>\d+)(?(paren)\s*\)))?"
    # "Score: 4 -> 3", "Score: 5 points minus 1 = 4": a score revised after it, which is no verdict to read.
    r"(?P<revised>[*_\s]*(?:points?\b[*_\s]*)?(?:->|=>|→|⇒|\bminus\b))?",
    re.IGNORECASE,
)


def _number(word: str) -> float:
    return float(_NUMBER_WORDS.get(word.lower(), word))


# What may stand before a verdict on its line: nothing but markup, the end of a sentence or clause, or a word that
# makes it the whole's ("Total score: 3", "so the score: 4"). Any other word makes it the score of a part or an
# aside ("Relevance score: 1", "(criterion 5) score: 0", "I first thought Score: 2"), which is not the verdict.
_VERDICT_LEAD = re.compile(
    r"(?:\A|[\n.!?:;,\"'*_#>-]|\b(?:total|final|overall|the|a|my|its|this)\b)[\s*_#>-]*\Z", re.IGNORECASE)


# A list item with a label of its own before its score ("- Relevant: yes. Score: 1", "2. Substance: Score: 1"), unless
# the label names the whole.
_LABELLED_ITEM = re.compile(r"[\s*_#>]*(?:[-*•+]|\d+[.)])\s+[*_]*(?P<label>[^:\n]+?)[*_]*:")
_WHOLE_LABEL = re.compile(r"total|final|overall|verdict|conclu|summary|result", re.IGNORECASE)


def verdicts(text: str) -> list[re.Match]:
    """Every "Score: N" in `text` that stands as a verdict (see `_VERDICT_LEAD`), in order. Scores on two or more
    labelled list items are the rubric's criteria scored one by one, not verdicts, though each line looks like one."""
    found = [m for m in SCORE_PATTERN.finditer(text)
             if _VERDICT_LEAD.search(text, max(0, text.rfind("\n", 0, m.start())), m.start())]

    def item(m: re.Match) -> bool:
        head = _LABELLED_ITEM.match(text, text.rfind("\n", 0, m.start()) + 1, m.start())
        return head is not None and not _WHOLE_LABEL.search(head.group("label"))

    items = [m for m in found if item(m)]
    return [m for m in found if m not in items] if len(items) > 1 else found


def parse_score(text: str) -> tuple[float | None, str | None]:
    """The score a judgment concludes with, or (None, reason) when it has none that is valid.

    The last verdict "Score: N" counts (the prompt asks to conclude with it; the rubric's placeholder is no score).
    Scores of parts ("Relevance score: 1") are not verdicts, and two verdicts that disagree make a failure, not a
    choice between them: a judge that wrote "Score: 4" and went on to a made-up next turn ending "Score: 2" said
    nothing this parser can trust. A score out of another scale ("8/10") or out of [0, 5] is a failure, not
    rescaled or clipped: the judge did not follow the rubric.
    """
    found = verdicts(text)
    if not found:
        part = SCORE_PATTERN.search(text)
        if part:
            line_start = text.rfind("\n", 0, part.start()) + 1
            return None, ("no verdict 'Score: N', only scores of parts or led by other words "
                          f"({text[line_start : part.end()].strip()[:60]})")
        if re.search(r"score\s*:\s*<\s*total", text, re.IGNORECASE):
            return None, "placeholder copied from the prompt instead of a score"
        return None, "no 'Score: N' found"
    score, error = _read_score(found[-1])
    if score is not None:
        others = {v for v, _ in map(_read_score, found[:-1]) if v is not None and v != score}
        if others:
            return None, f"verdicts that disagree ({', '.join(f'{v:g}' for v in sorted(others))}, then {score:g})"
    return score, error


def _read_score(match: re.Match) -> tuple[float | None, str | None]:
    """One SCORE_PATTERN match read as a score, or (None, why it is none)."""
    raw = match.group("value").lower()
    if match.group("revised"):
        return None, f"a score revised after it ({match.group(0).strip()} ...)"
    if match.group("range"):
        return None, f"not one score ({match.string[match.start('value') : match.end('range')]})"
    if match.group("sum"):
        terms = [raw, *re.findall(_NUMBER, match.group("sum"), re.IGNORECASE)]
        total = match.group("total")
        if total is None:
            return None, f"a sum without its total ({match.group('value')}{match.group('sum')})"
        if abs(sum(map(_number, terms)) - _number(total)) > 1e-9:
            return None, f"a total that is not the sum ({match.group(0).strip()})"
        raw = total.lower()
    value = _number(raw)
    scale = match.group("scale")
    if scale is not None and float(scale) != MAX_SCORE:
        return None, f"score on another scale ({raw}/{scale})"
    if not 0 <= value <= MAX_SCORE:
        return None, f"score {raw} outside [0, 5]"
    return value, None


def eft_format_problem(judgment: str) -> str | None:
    """Why an EFT judgment is not a training target in the paper's format, or None. The judge learns to write what
    it is trained on: a score that parses anywhere is not enough, the judgment must end with a line 'Score: N', N a
    whole number 0-5 (text after it, 'four out of 5' or 'score=3' would teach it other formats)."""
    _, error = parse_score(judgment)
    if error is not None:
        return error
    lines = judgment.strip().splitlines()
    if not re.fullmatch(r"Score: [0-5]", lines[-1].strip()):
        return f"its last line is {lines[-1].strip()[:40]!r}, not 'Score: N' with N a whole number 0-5"
    return None


def check_failure_rate(judgments: Sequence[Judgment], limit: float, where: Path, what: str) -> None:
    """PAPER.md §7: refuse to go on (JudgeIntegrityError) from judgments more of which than `limit` did not parse;
    `what` names them in the message ("iteration 2")."""
    if not judgments:
        return
    failures = sum(j.score is None for j in judgments) / len(judgments)
    if failures > limit:
        raise JudgeIntegrityError(
            f"{what}: {100 * failures:.1f}% of judgments did not parse (limit judge.max_failure_rate={limit}); the "
            "judge does not follow the 'Score: N' format well enough to train on. More EFT data or SFT epochs usually "
            f"fix it; see {where} for what it wrote")


# Text a judge could mistake for its own verdict (PAPER.md §7, reward hacking): a verdict its own parser would read
# ("Score: 5", "**Score:** 5", "Score: five") outside code, or the rubric's words. Not every number called a score:
# "self.score = 0" in code, "Quiz score: 3" or "an AP score of 5" are what answers about games and exams say.
_GAMING = re.compile(r"additive 5-point|bestow a fifth point|<total points>|"
                     r"\b(?:deserves?|earns?|merits?|warrants?)\s+(?:a\s+)?(?:score|rating)\s+of\s+[45]\b", re.IGNORECASE)
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)


def contains_judge_text(response: str) -> bool:
    prose = _CODE.sub("\n", response)
    # "score = 0" is an assignment far more often than a verdict, so only "Score:" counts here.
    return bool(_GAMING.search(prose)) or any(
        _read_score(m)[0] is not None and ":" in m.group(0) for m in verdicts(prose))


def judge_options(config) -> dict:
    """judge's keyword arguments from a RunConfig (all but the seed)."""
    j = config.judge
    return dict(k=j.k, temperature=j.temperature, top_p=j.top_p, max_new_tokens=j.max_new_tokens,
                template=load_template(j.template), batch_size=config.generation.batch_size)


def judge(
    generator: Generator,
    prompts: Sequence[Prompt],
    candidates: Sequence[Candidate],
    out_path: Path,
    *,
    k: int = 3,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 256,
    template: str = PAPER_TEMPLATE,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> list[Judgment]:
    """Judge every candidate k times: `candidates.jsonl` -> `judgments.jsonl` (PAPER.md §4.3).

    Resumable per batch: judgments already in `<out>.partial` are kept and not sampled again. Every
    judgment is written, parsed or not; failures carry `score=None` and the reason in `error`.
    """
    by_id = {p.id: p for p in prompts}
    work = [(c, s) for c in candidates for s in range(k)]
    log = RecordLog(out_path, Judgment)
    batches = plan_batches(work, lambda cs: len(cs[0].text) + len(by_id[cs[0].prompt_id].text), batch_size)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    for index, batch in enumerate(batches):
        ids = [f"{c.id}-j{s}" for c, s in batch]
        if all(i in log.done for i in ids):
            if progress:
                progress.update(len(batch))
            continue
        requests = [judge_request(template, by_id[c.prompt_id].text, c.text) for c, _ in batch]
        outputs = generator.generate(requests, batch_params(params, index))
        records = []
        for jid, (c, s), out in zip(ids, batch, outputs):
            score, error = parse_score(out.text)
            if score is None and out.truncated:
                error = f"{error} (cut off at max_new_tokens)"
            records.append(Judgment(id=jid, candidate_id=c.id, prompt_id=c.prompt_id, sample=s, text=out.text,
                                    score=score, error=error))
        log.append(records)
        if progress:
            progress.update(len(batch))
    order = {f"{c.id}-j{s}": n for n, (c, s) in enumerate(work)}
    return sorted(log.finish(), key=lambda j: order.get(j.id, len(order)))


SCORE_CHOICES = tuple(f" {d}" for d in range(int(MAX_SCORE) + 1))


def expected_score(probs: Sequence[float], min_mass: float) -> tuple[float | None, str | None]:
    """The mean of 0..5 under `probs` (P of each digit after "Score:"), renormalised over the digits; a failure
    when the digits get less than `min_mass` of the probability (the judge would have written something else)."""
    mass = sum(probs)
    if mass < min_mass or mass <= 0:
        return None, f"the digits 0-5 got {100 * mass:.0f}% of the probability after 'Score:' (< {100 * min_mass:.0f}%)"
    return sum(d * p for d, p in enumerate(probs)) / mass, None


def judge_expected(
    generator,
    prompts: Sequence[Prompt],
    candidates: Sequence[Candidate],
    out_path: Path,
    *,
    template: str = PAPER_TEMPLATE,
    batch_size: int = 16,
    min_mass: float = 0.5,
    justify: bool = False,
    max_new_tokens: int = 256,
    reuse_prefix: bool = True,
    seed: int = 0,
    progress=None,
) -> list[Judgment]:
    """The `expected` judge mode: one judgment per candidate, scored from the next-token distribution.

    The judge prompt is the same; the assistant's turn is opened with "Score:" (or, with `justify`, with one
    greedy justification cut before its own "Score:") and the score is the probability-weighted mean of the
    digits 0-5. This is not the paper's procedure (PAPER.md §4.3 samples k=3 justifications): it trades the
    justification for speed and gives continuous scores, which make ties rare. Resumable per batch like
    `judge`. Needs a backend with token probabilities (`choice_probs`: the hf backend).
    """
    if not hasattr(generator, "choice_probs"):
        raise ConfigError("judge.mode=expected needs token probabilities, which the hf and vllm backends give; use "
                          "judge.mode=sample with this backend")
    by_id = {p.id: p for p in prompts}
    log = RecordLog(out_path, Judgment)
    batches = plan_batches(list(candidates), lambda c: len(c.text) + len(by_id[c.prompt_id].text), batch_size)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=seed, stop=("Score:", "score:"))
    for batch in batches:
        ids = [f"{c.id}-e" for c in batch]
        if all(i in log.done for i in ids):
            if progress:
                progress.update(len(batch))
            continue
        requests = [judge_request(template, by_id[c.prompt_id].text, c.text) for c in batch]
        texts = [""] * len(batch)
        if justify:
            texts = [out.text for out in generator.generate(requests, greedy)]
        prefills = [f"{t}\nScore:" if t else "Score:" for t in texts]
        probs = generator.choice_probs(requests, prefills, SCORE_CHOICES, reuse_prefix=reuse_prefix)
        records = []
        for jid, c, text, p in zip(ids, batch, texts, probs):
            score, error = expected_score(p, min_mass)
            records.append(Judgment(id=jid, candidate_id=c.id, prompt_id=c.prompt_id, sample=0, text=text,
                                    score=score, error=error, score_probs=[round(x, 6) for x in p]))
        log.append(records)
        if progress:
            progress.update(len(batch))
    order = {f"{c.id}-e": n for n, c in enumerate(candidates)}
    return sorted(log.finish(), key=lambda j: order.get(j.id, len(order)))


def run_judge(generator, prompts: Sequence[Prompt], candidates: Sequence[Candidate], out_path: Path, config, *,
              seed: int, progress=None) -> list[Judgment]:
    """The judging stage as the config asks for it (judge.mode): what `srlm run`, `srlm judge` and `srlm eval
    judge` all call."""
    j = config.judge
    if j.mode == "expected":
        return judge_expected(generator, prompts, candidates, out_path, template=load_template(j.template),
                              batch_size=config.generation.batch_size, min_mass=j.expected_min_mass,
                              justify=j.expected_justify, max_new_tokens=j.max_new_tokens,
                              reuse_prefix=j.reuse_prefix, seed=seed, progress=progress)
    return judge(generator, prompts, candidates, out_path, seed=seed, progress=progress, **judge_options(config))


def judgments_per_candidate(config) -> int:
    return 1 if config.judge.mode == "expected" else config.judge.k
