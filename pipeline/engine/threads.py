"""Torch's intra-op threads around the small per-frame host ops.

The model forward is worth torch's OpenMP team; preprocessing and post-processing (a resize and a
normalisation per frame, two small matmuls per map: a few MFLOP) are not. With the team on them,
every op waits at a barrier for a second thread that the worker's own decode threads keep off
the CPU on a small machine, and that thread then spins between ops, taking the CPU the decode
threads need: on 2 cores the 1080p scoring worker spent 6.8-20.7 ms of CPU per frame with a free
forward, 4.5-6.5 without (bench/README.md, Spine). The results do not depend on the thread count
(elementwise ops and matmuls too small to split their sums).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Torch ops of the calling thread run on that thread alone meanwhile; other threads keep theirs.

    ``torch.set_num_threads`` sets this thread's OpenMP and MKL thread counts, and the default that
    a thread running its first torch op starts from: a thread started meanwhile starts from 1
    (see ``pin_intra_op_threads``).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pin_intra_op_threads(threads: int) -> None:
    """Initializer of a thread that runs model forwards: its own thread count, whatever default it
    would pick up from a thread inside ``one_intra_op_thread`` at that moment."""
    torch.set_num_threads(threads)
