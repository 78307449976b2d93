"""Measurement helpers shared by the bench scripts.

* :func:`median_seconds`: the median time of a call after one warm-up call;
* :func:`update_times`: the seconds of every criterion update inside ``pyobc.score`` (tracing and setup
  excluded), by wrapping the criterion class's ``update`` while the block runs;
* :func:`peak_rss_growth`: the peak resident-memory growth of one call over the resident size just before
  it (after ``gc`` and ``malloc_trim``), sampled every 0.5 ms by a thread (torch kernels release the GIL);
* :func:`peak_in_child`: the same in a fresh Python process, so that earlier allocations do not hide it.

Example:
    >>> growth = peak_rss_growth(lambda: bytearray(64 * 2**20))
    >>> growth > 32 * 2**20
    True
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def update_times(method: str, sync: Callable[[], None] | None = None,
                 before: tuple[Callable[[], object], list[float]] | None = None) -> Iterator[list[float]]:
    """A list that receives the seconds of each ``update`` of criterion ``method`` while the block runs
    (``sync`` is called before and after each one, e.g. ``torch.cuda.synchronize``). ``before``:
    ``(fn, seconds)`` runs ``fn`` right before each update and appends its seconds to ``seconds``, so a
    reference (one forward+backward) and the update are timed as neighbours, pair by pair."""
    from pyobc.criteria import get_method

    cls, times = get_method(method), []
    original = cls.update

    def timed(self, batch):
        if before is not None:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            before[0]()
            if sync is not None:
                sync()
            before[1].append(time.perf_counter() - t0)
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        original(self, batch)
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)

    cls.update = timed
    try:
        yield times
    finally:
        cls.update = original


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(run: Callable[[], object]) -> int:
    """Peak resident-memory growth in bytes while ``run()`` executes (see the module docstring)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - base


def peak_in_child(setup: str, call: str) -> int:
    """:func:`peak_rss_growth` of the expression ``call`` in a fresh Python process, after running the
    statements ``setup`` there (with ``bench/`` on ``sys.path``)."""
    code = (f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom measure import peak_rss_growth\n{setup}\n"
            f"print(peak_rss_growth(lambda: {call}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"measuring {call!r} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])
