"""Progress bars (tqdm on stderr), shown by default only when stderr is a terminal.

Example:
    >>> from pyobc.progress import progress_bar, show_progress
    >>> show_progress(False)
    False
    >>> list(progress_bar(range(3), enabled=False))
    [0, 1, 2]
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

__all__ = ["show_progress", "progress_bar"]


def show_progress(progress: bool | None) -> bool:
    """The user's ``progress=`` choice; ``None`` means "when stderr is a terminal"."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def progress_bar(iterable: Iterable | None = None, enabled: bool = True, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` on stderr when ``enabled``, else ``iterable`` itself.

    With ``iterable=None`` and ``enabled`` a manual bar (``update``/``close``) is returned, and ``None``
    when disabled.
    """
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # a dependency of pyobc; imported late because it is slow to import

    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)
