"""Torch's intra-op thread count, set for a block and restored after it; matrix products of NumPy arrays on
torch's threads.

One intra-op thread suits code that runs many small tensor operations, or its own worker threads; that
setting is counted, because the thread count is global to the process: it is made when the first caller
enters and undone when the last one leaves, whichever threads they run on.
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import torch

_lock = threading.Lock()
_holders = 0
_saved = 1


@contextmanager
def single_intraop_thread():
    """Run the block with ``torch.get_num_threads() == 1``; yields the thread count that was set before."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _holders += 1
        before = _saved
    try:
        yield before
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                torch.set_num_threads(_saved)


@contextmanager
def intraop_threads(threads: int | None):
    """Run the block with ``threads`` intra-op threads (None: leave the count as it is), then restore it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_beside_workers(workers: int) -> int:
    """Intra-op threads that leave each data worker a core of this process's CPUs (at least one thread)."""
    return max(1, len(os.sched_getaffinity(0)) - workers)


def torch_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of NumPy arrays, in the wider of their dtypes (as NumPy's ``@``), computed by torch on its threads.

    For code that runs between torch's model calls, such as a search after encoding its query: NumPy's BLAS
    keeps threads of its own, which spin for a while after each product large enough to share out, and then
    take the cores from torch's threads on the next call (measured in ``clipforge serve`` on 2 cores: an int8
    text query 9 ms after a search whose re-scoring product ran here, 35 ms after one that ran in NumPy)."""
    dtype = np.result_type(a, b)
    return (read_only_tensor(np.asarray(a, dtype=dtype)) @ read_only_tensor(np.asarray(b, dtype=dtype))).numpy()


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing (not copying) ``array``, which may be read-only (a memory map): it is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        return torch.from_numpy(np.asarray(array))
