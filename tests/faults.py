"""Fault injection for the tests: hooks that SIGKILL a process at a chosen point of a write.

Production code calls its hook after each step of a write (e.g. ``nemo_dcod.score.columns``'s
``on_write(event, shard)``); :class:`KillAt` turns the ``count``-th such event of one rank into a
real ``SIGKILL`` of that rank's process: nothing is flushed, no ``finally`` runs. It is picklable
(a module-level class), so it reaches ranks started with ``spawn``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KillAt"]


class KillAt:
    """SIGKILL this process at the ``count``-th ``event`` (on rank ``rank`` only, if given).

    The rank is read from ``RANK`` (set by torchrun, srun wrappers and ``run_local``); 0 if unset.
    """

    def __init__(self, event: str, count: int = 1, rank: int | None = None) -> None:
        self.event, self.count, self.rank = event, count, rank
        self.seen = 0

    def __call__(self, event: str, where: str) -> None:
        del where
        if self.rank is not None and int(os.environ.get("RANK", "0")) != self.rank:
            return
        if event == self.event:
            self.seen += 1
            if self.seen >= self.count:
                os.kill(os.getpid(), signal.SIGKILL)
