"""Candidate responses (PAPER.md §4.2): N samples of M(t) for every new prompt."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .backends import Generator, SamplingParams, batch_params, plan_batches
from .judging import contains_judge_text
from .records import Candidate, Prompt, RecordLog


def respond_options(config) -> dict:
    """respond's keyword arguments from a RunConfig (all but the seed)."""
    c = config.candidates
    return dict(n=c.n, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                batch_size=config.generation.batch_size)


def respond(
    generator: Generator,
    prompts: Sequence[Prompt],
    out_path: Path,
    *,
    n: int = 4,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> list[Candidate]:
    """`prompts.jsonl` -> `candidates.jsonl`: N responses per prompt, each a chat turn of the model.

    Resumable per batch. Responses that contain judge-format text are written with `flagged=True`
    (PAPER.md §7: a response saying "Score: 5" can fool the judge that reads it), and those cut at
    `max_new_tokens` with `truncated=True`.
    """
    work = [(p, i) for p in prompts for i in range(n)]
    log = RecordLog(out_path, Candidate)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    for index, batch in enumerate(plan_batches(work, lambda pi: len(pi[0].text), batch_size)):
        ids = [f"{p.id}-c{i}" for p, i in batch]
        if all(i in log.done for i in ids):
            if progress:
                progress.update(len(batch))
            continue
        outputs = generator.generate([[{"role": "user", "content": p.text}] for p, _ in batch],
                                     batch_params(params, index))
        log.append(
            Candidate(id=cid, prompt_id=p.id, index=i, text=out.text, n_tokens=out.n_tokens,
                      flagged=contains_judge_text(out.text), truncated=out.truncated)
            for cid, (p, i), out in zip(ids, batch, outputs)
        )
        if progress:
            progress.update(len(batch))
    order = {f"{p.id}-c{i}": k for k, (p, i) in enumerate(work)}
    return sorted(log.finish(), key=lambda c: order.get(c.id, len(order)))


def truncation_warning(candidates: Sequence[Candidate], cap: int, limit: float) -> str | None:
    """What to tell the user when more than `limit` of the candidates were cut at the length cap `cap`, or None."""
    cut = sum(c.truncated is True for c in candidates)
    if not candidates or cut / len(candidates) <= limit:
        return None
    return (f"{100 * cut / len(candidates):.0f}% of candidates were cut at candidates.max_new_tokens={cap}: their "
            "lengths are the cap's, so length growth (PAPER.md §7) is understated, and the judge reads unfinished "
            "responses; a higher cap lets them finish")
