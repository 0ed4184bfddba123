"""Progress bars for long work (generation, judging): on stderr, so stdout stays the command's result.

A bar counts a stage's items (candidates, judgments), which a stage can only count a batch at a time: on a CPU a batch
of 128 rows of up to 512 tokens runs for minutes. So while a bar is open, backends also report each token they sample
(`tokens_sampled`), and the bar shows the count and the rate since it opened ("12,480 tok, 151 tok/s"): it moves
within a batch and says how fast sampling runs. The bar is found through a context variable rather than passed down,
so the `Generator` interface (backends/__init__.py) and every stage's fakes stay as they are.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

_sink: ContextVar[Callable[[int], None] | None] = ContextVar("srlm_tokens_sampled", default=None)

REFRESH_S = 0.5  # the most often a bar is redrawn for tokens alone: a GPU samples a step every few milliseconds


def tokens_sampled(n: int) -> None:
    """Backends call this as they sample: `n` more tokens (one decoding step's rows, or a finished request's tokens).
    Nothing happens outside a bar."""
    sink = _sink.get()
    if sink is not None and n > 0:
        sink(n)


class TokenCounter:
    """Counts the tokens reported while a bar is open and shows them, with their rate, as the bar's postfix."""

    def __init__(self, progress, clock: Callable[[], float] = time.monotonic):
        self.progress, self.clock = progress, clock
        self.tokens = 0
        self.opened = clock()
        self.drawn = float("-inf")

    def __call__(self, n: int) -> None:
        self.tokens += n
        now = self.clock()
        if now - self.drawn >= REFRESH_S:
            self.drawn = now
            self.progress.set_postfix_str(self.postfix(now), refresh=True)

    def postfix(self, now: float) -> str:
        elapsed = now - self.opened
        rate = f", {self.tokens / elapsed:,.0f} tok/s" if elapsed > 0 else ""
        return f"{self.tokens:,} tok{rate}"

    def close(self) -> None:
        if self.tokens:  # the final count, whatever the last redraw showed
            self.progress.set_postfix_str(self.postfix(self.clock()), refresh=False)


@contextmanager
def reporting_tokens(sink: Callable[[int], None]):
    """Within this block, the tokens backends sample are reported to `sink` (a bar's counter, or a caller's own)."""
    token = _sink.set(sink)
    try:
        yield sink
    finally:
        _sink.reset(token)


@contextmanager
def bar(total: int, desc: str):
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc=desc, unit="", dynamic_ncols=True, file=sys.stderr)
    counter = TokenCounter(progress)
    try:
        with reporting_tokens(counter):
            yield progress
    finally:
        counter.close()
        progress.close()
