"""One CPU thread for the small maths of a retrain: the heads, the orderings, k-means.

Their matrices are small (a few thousand rows): extra threads only add synchronisation, and
on a busy machine (web workers, other jobs, the encoder of another project) the spinning
threads of the thread pools cost far more than they save. Measured on the 2-core machine at
load 7: a 50-example head fit took 20 s instead of 0.5 s with torch's OpenMP threads; a
(1,670 x 385) matrix-vector product of the orderings' logistic heads 23 ms with numpy's two
OpenBLAS threads against 0.28 ms with one; a first k-means fit of 11,000 vectors 3-10 s
against 0.2-0.3 s (BENCHMARKS.md, issue 13 point 6). The encoder keeps all threads.

`threadpoolctl` (scikit-learn's own dependency) sets the BLAS and OpenMP pools that numpy,
scipy and scikit-learn load; torch's intra-op pool has its own setting.
"""

from __future__ import annotations

import contextlib
import functools
import sys

_controller = None
_modules_seen = -1


def _thread_pools():
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries, found again only when modules
    were imported since (finding them walks every loaded shared library: 15 ms with torch
    loaded on the busy machine, and the heads' forward passes enter `one_thread` often)."""
    global _controller, _modules_seen
    from threadpoolctl import ThreadpoolController

    if _controller is None or len(sys.modules) != _modules_seen:
        _controller, _modules_seen = ThreadpoolController(), len(sys.modules)
    return _controller


@contextlib.contextmanager
def one_thread():
    """Run the enclosed maths on one thread (torch, if loaded, and every BLAS/OpenMP pool)."""
    torch = sys.modules.get("torch")  # not loaded: nothing of torch runs here
    previous = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with _thread_pools().limit(limits=1):
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(previous)


def on_one_thread(function):
    """`function` run inside `one_thread()`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with one_thread():
            return function(*args, **kwargs)

    return wrapper
