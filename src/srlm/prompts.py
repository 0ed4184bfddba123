"""Prompt generation (PAPER.md §4.1): new prompts by few-shot prompting, Self-Instruct style.

Each call shows the model 8 example tasks (paper: 6 from the human seed, 2 written by the model in this
iteration) and lets it continue the list with one more. The result passes the Self-Instruct filters:
length bounds, a keyword filter for tasks a text model cannot do, and ROUGE-L similarity to every prompt
already known, earlier iterations' included (drop if > 0.7). Every attempt is recorded with its fate, so the
summary can say how many were generated, kept, and dropped for which reason.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from .backends import Generator, SamplingParams, batch_params
from .records import Prompt, Record, RecordLog, write_jsonl

HEADER = "Come up with a series of tasks and questions for an AI assistant. Write only the task, on one line.\n\n"


class PromptAttempt(Record):
    """One generated prompt and what the filters made of it (`reason` is None when kept)."""

    id: str
    text: str
    kept: bool
    reason: str | None = None


def few_shot_request(examples: Sequence[str]) -> str:
    # A raw-text continuation, not a chat turn: even a small model continues a numbered list reliably.
    lines = [f"Task {i}: {' '.join(e.split())}" for i, e in enumerate(examples, start=1)]
    return HEADER + "\n".join(lines) + f"\nTask {len(examples) + 1}:"


def clean(text: str) -> str:
    """The prompt without the list's own marking: a leading "Task 9:" the model repeated, and quotes around the
    whole. "Task-based learning" and a quote that opens the prompt without closing it are the prompt's own."""
    text = re.sub(r"^task\s*(?:\d+\s*[:.)-]|:)\s*", "", text.strip(), flags=re.IGNORECASE).strip()
    if len(text) > 1 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
    return text


# Letters of scripts written without spaces (Chinese, Japanese kana, Thai...) are a token each; any other run of
# word characters is one, whatever its script.
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+")
_WORD = re.compile(rf"[{_UNSPACED}]|[^\s{_UNSPACED}]+")  # the length bounds' words: split()'s, a letter each there


class _Words:
    """rouge_score's tokenizer keeps only [a-z0-9], so two prompts in Russian or Chinese score 0 however alike:
    words of every script, lowercased."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower())


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_Words())


def rouge_l(a: str, b: str) -> float:
    return _scorer().score(a, b)["rougeL"].fmeasure


CUT = "cut at the length cap (prompts.max_new_tokens)"


def filter_reason(
    text: str,
    existing: Sequence[str],
    *,
    min_words: int,
    max_words: int,
    blocked_keywords: Sequence[str],
    rouge_l_max: float,
) -> str | None:
    """Why a generated prompt is dropped, or None to keep it (Self-Instruct's filters)."""
    words = _WORD.findall(text)
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too short"
    if len(words) > max_words:
        return "too long"
    if not text[0].isalnum() and text[0] not in "\"'(¿¡":
        return "starts with punctuation"
    lowered = text.lower()
    for keyword in blocked_keywords:
        if re.search(rf"\b{re.escape(keyword.lower())}(?:s|es)?\b", lowered):  # "graph" blocks "graphs" too
            return "keyword filter"
    for other in existing:
        if lowered == other.lower():
            return "duplicate"
    for other in existing:
        if rouge_l(text, other) > rouge_l_max:
            return "too similar (ROUGE-L)"
    return None


def prompt_options(config, num_prompts: int | None = None) -> dict:
    """generate_prompts' keyword arguments from a RunConfig (all but the seed)."""
    p = config.prompts
    num = num_prompts or p.num_prompts
    # A batch's few-shot examples can only include model-written prompts kept by earlier batches (PAPER.md §4.1:
    # 6 human + 2 model-written), and it is generated whole: no batch much larger than what is still needed.
    batch = min(config.generation.batch_size, max(16, num))
    return dict(num_prompts=num, few_shot_human=p.few_shot_human, few_shot_model=p.few_shot_model,
                temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens, min_words=p.min_words,
                max_words=p.max_words, blocked_keywords=p.blocked_keywords, rouge_l_max=p.rouge_l_max,
                max_attempts=int(num * p.max_attempts_factor), batch_size=batch)


def _replay(log: RecordLog, batch_ids, num_prompts: int) -> tuple[list[str], int]:
    """(the prompts kept by the batches the log holds whole, the first batch to generate) on resume.

    A batch's few-shot examples come from the prompts kept before it, so a batch the log holds only part of (a kill
    or a full disk in the middle of its write) is generated again from the prompts kept before it: what it wrote is
    then written again alike, rather than the batch asked anew from a pool that already holds its own prompts. The
    last batch of a stage is whole when it stopped at the prompt that made `num_prompts`."""
    by_id = {a.id: a for a in log.records}
    kept: list[str] = []
    batch_index = 0
    while len(kept) < num_prompts:
        present = [by_id[i] for i in batch_ids(batch_index) if i in by_id]
        own = [a.text for a in present if a.kept]
        whole = len(present) == len(batch_ids(batch_index)) or (
            present and present[-1].kept and len(kept) + len(own) == num_prompts)
        if not whole:
            break
        kept += own
        batch_index += 1
    return kept, batch_index


def generate_prompts(
    generator: Generator,
    seed_prompts: Sequence[str],
    out_path: Path,
    *,
    iteration: int,
    num_prompts: int,
    few_shot_human: int = 6,
    few_shot_model: int = 2,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_new_tokens: int = 96,
    min_words: int = 4,
    max_words: int = 150,
    blocked_keywords: Sequence[str] = (),
    rouge_l_max: float = 0.7,
    earlier: Sequence[str] = (),
    max_attempts: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> tuple[list[Prompt], list[PromptAttempt]]:
    """Write `num_prompts` new prompts to `out_path` (and every attempt to `<stem>_attempts.jsonl`).

    A new prompt must differ (ROUGE-L) from the seed prompts, from those kept so far, and from `earlier` (the
    prompts of earlier iterations, which are no few-shot examples). Resumable per batch of attempts; stops early
    (with fewer prompts) after `max_attempts` generations, since a weak model may produce mostly near-duplicates.
    """
    if not seed_prompts:
        raise ValueError("prompt generation needs at least one seed prompt for the few-shot examples")
    attempts_path = out_path.with_name(out_path.stem + "_attempts.jsonl")
    log = RecordLog(attempts_path, PromptAttempt)
    max_attempts = max_attempts or num_prompts * 4
    batch_ids = lambda b: [f"it{iteration}-a{b * batch_size + i:06d}" for i in range(batch_size)]
    kept, batch_index = _replay(log, batch_ids, num_prompts)
    # Attempts of a batch the log holds part of stand as written when it is asked again: a backend that samples
    # otherwise the second time (a server, vLLM's batching) would else keep prompts the attempts file never saw.
    logged = {a.id: a for a in log.records}
    known = list(seed_prompts) + list(earlier) + kept
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                            stop=("\n",))
    if progress:
        progress.update(min(len(kept), num_prompts))
    while len(kept) < num_prompts and batch_index * batch_size < max_attempts:
        ids = batch_ids(batch_index)
        rng = random.Random(seed * 7919 + iteration * 104729 + batch_index)
        requests = []
        for _ in ids:
            own = rng.sample(kept, min(few_shot_model, len(kept)))
            human = rng.sample(list(seed_prompts), min(few_shot_human + few_shot_model - len(own), len(seed_prompts)))
            examples = human + own
            rng.shuffle(examples)
            requests.append(few_shot_request(examples))
        outputs = generator.generate(requests, batch_params(params, batch_index))
        records = []
        for aid, out in zip(ids, outputs):
            if len(kept) >= num_prompts:
                break  # the rest of the last batch is not needed; unrecorded, it does not skew filter counts
            attempt = logged.get(aid)
            if attempt is None:
                text = clean(out.text)
                # The line went on past the cap: what is here is part of a prompt (and no length filter sees it).
                reason = CUT if out.truncated else filter_reason(
                    text, known, min_words=min_words, max_words=max_words, blocked_keywords=blocked_keywords,
                    rouge_l_max=rouge_l_max)
                attempt = PromptAttempt(id=aid, text=text, kept=reason is None, reason=reason)
            if attempt.kept:
                kept.append(attempt.text)
                known.append(attempt.text)
                if progress:
                    progress.update(1)
            records.append(attempt)
        log.append(records)
        batch_index += 1
    attempts = log.finish()
    prompts = [Prompt(id=f"it{iteration}-p{n:05d}", text=text, iteration=iteration) for n, text in enumerate(kept)]
    write_jsonl(out_path, prompts)
    return prompts, attempts
