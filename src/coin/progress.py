"""Progress bars on a terminal, and none in a log.

tqdm draws a bar by rewriting one line with carriage returns. A piped stderr (CI, a Prefect worker, ``2> log``)
keeps every frame: a run's training bar became one physical line of hundreds of frames, with the next log record
glued to its end. :func:`bar` draws only where stderr is a terminal; where it is not, long work says how far it got
in log lines of its own (training: :func:`every`).
"""

from __future__ import annotations

import sys
from typing import Any


def on_terminal() -> bool:
    """Whether stderr is a terminal (a bar can be redrawn in place there)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def bar(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``, drawn when ``show`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (show and on_terminal()), **kwargs)


def every(total: int, lines: int = 10) -> int:
    """How many steps apart to log progress without a bar: about ``lines`` lines over ``total`` steps."""
    return max(1, -(-total // lines))
