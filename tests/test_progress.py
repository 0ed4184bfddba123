"""Progress bars: the tokens backends sample reach the bar open around them, with their rate."""
from __future__ import annotations

from srlm.progress import REFRESH_S, TokenCounter, bar, reporting_tokens, tokens_sampled


class FakeBar:
    def __init__(self):
        self.shown: list[tuple[str, bool]] = []

    def set_postfix_str(self, text: str, refresh: bool = True):
        self.shown.append((text, refresh))


def test_counter_shows_count_and_rate_and_redraws_at_most_every_refresh_interval():
    now = [100.0]
    shown = FakeBar()
    counter = TokenCounter(shown, clock=lambda: now[0])
    now[0] = 102.0
    counter(300)  # first report: drawn at once
    now[0] = 102.0 + REFRESH_S / 2
    counter(100)  # too soon after the last redraw: counted, not drawn
    now[0] = 102.0 + REFRESH_S
    counter(100)
    assert counter.tokens == 500
    assert [text for text, _ in shown.shown] == ["300 tok, 150 tok/s", f"500 tok, {500 / (2 + REFRESH_S):,.0f} tok/s"]
    now[0] = 110.0
    counter(1000)
    counter.close()  # the final count is shown whatever the throttle skipped
    assert shown.shown[-1] == ("1,500 tok, 150 tok/s", False)


def test_a_counter_with_no_tokens_leaves_the_bar_alone():
    shown = FakeBar()
    TokenCounter(shown).close()
    assert shown.shown == []


def test_tokens_go_to_the_innermost_open_sink_and_nowhere_outside_one():
    outer, inner = [], []
    tokens_sampled(5)  # no sink: ignored
    with reporting_tokens(outer.append):
        tokens_sampled(1)
        with reporting_tokens(inner.append):
            tokens_sampled(2)
            tokens_sampled(0)  # nothing sampled: not reported
        tokens_sampled(3)
    tokens_sampled(4)
    assert outer == [1, 3] and inner == [2]


def test_bar_shows_the_tokens_sampled_inside_it(capsys):
    with bar(2, "candidates") as progress:
        tokens_sampled(40)
        tokens_sampled(2)
        progress.update(2)
    err = capsys.readouterr().err
    assert "candidates" in err and "42 tok" in err
    tokens_sampled(7)  # closed: nothing left to report to
    assert "49 tok" not in capsys.readouterr().err
