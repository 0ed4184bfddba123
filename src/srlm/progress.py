"""Progress bars for long work (generation, judging): on stderr, so stdout stays the command's result."""
from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def bar(total: int, desc: str):
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc=desc, unit="", dynamic_ncols=True, file=sys.stderr)
    try:
        yield progress
    finally:
        progress.close()
