"""Naming the phase and the rank when a collective fails: a hung or lost rank made readable.

When one rank hangs (a stuck file system, a stopped process), the others wait in their next
collective until ``run.dist_timeout_s`` and fail with a transport error that names neither
what the job was doing nor which rank is missing. Each rank records in the job's store
(``distributed.job_store``, kept by the torchrun agent, so it answers while a rank hangs)
the phase it is in and, while training, its step. When a collective fails inside a phase,
the failing rank reports itself in the store, gives the other ranks a few seconds to do the
same, and raises ``HungRank`` naming the phase and every rank that did not report, with
where that rank was last seen.

With a ``record`` file, every phase also appends its wall time and the rank's peak resident
memory during it (JSON lines), the per-stage figures ``bench/bench_job.py`` reports.
"""

from __future__ import annotations

import functools
import json
import logging
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch.distributed as dist

from .. import distributed as du

log = logging.getLogger(__name__)

#: The phases of a job, as error messages name them.
PHASES = ("setup", "refresh", "teacher pass", "training", "validation", "test", "checkpoint")
#: Words of the transport errors gloo and NCCL raise when a peer hangs or is lost.
_TRANSPORT_WORDS = ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                    "socket", "peer")


class HungRank(RuntimeError):
    """A collective failed inside a phase; the message names the phase and the missing ranks."""


def is_transport_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure (timeout, lost peer), not an error of the work itself."""
    if isinstance(exc, HungRank):
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _TRANSPORT_WORDS)


class Watchdog:
    """Phase and progress of this rank in the job's store; diagnosis of a failed collective.

    ``where`` returns the position to report (generation, epoch, subset, step). ``grace_s``:
    how long a failing rank waits for the others to report the failure too.
    """

    def __init__(self, where: Callable[[], str], grace_s: float = 10.0, record: Optional[Path] = None) -> None:
        self.where = where
        self.grace_s = float(grace_s)
        self.record = Path(record) if record is not None else None
        self.phase_name = "setup"
        self.rank, self.world = du.get_rank(), du.get_world_size()
        self._last_beat = 0.0

    def _store(self):
        return du.job_store() if self.world > 1 else None

    def beat(self, every_s: float = 1.0) -> None:
        """Record phase, position and time (at most once per ``every_s`` seconds)."""
        store = self._store()
        now = time.time()
        if store is None or now - self._last_beat < every_s:
            return
        self._last_beat = now
        try:
            store.set(f"progress/{self.rank}", json.dumps({"phase": self.phase_name, "where": self.where(),
                                                           "time": now}))
        except Exception as exc:  # the store is gone: the collectives will say so
            log.debug("heartbeat not recorded: %s", exc)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a phase; a transport failure inside it becomes ``HungRank``."""
        prev, self.phase_name = self.phase_name, name
        self.beat(every_s=0.0)
        if self.record is not None:
            reset_peak_memory()
        t0 = time.monotonic()
        try:
            yield
        except Exception as exc:
            if self.world > 1 and is_transport_failure(exc):
                raise HungRank(self.diagnose(name, time.monotonic() - t0, exc)) from exc
            raise
        else:
            if self.record is not None:
                self._record(name, time.monotonic() - t0)
        finally:
            self.phase_name = prev

    def _record(self, name: str, seconds: float) -> None:
        self.record.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record, "a") as f:
            f.write(json.dumps({"phase": name, "where": self.where(), "seconds": round(seconds, 3),
                                "peak_rss_mb": round(peak_memory_mb(), 1), "rank": self.rank}) + "\n")

    def diagnose(self, phase: str, elapsed_s: float, exc: BaseException) -> str:
        """One line: the phase, this rank's position, and the ranks that did not report the failure."""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        head = (f"rank {self.rank}: a collective failed in the {phase} phase ({self.where()}) after "
                f"{elapsed_s:.0f} s in it: {first[:200]}")
        store = self._store()
        if store is None:
            return head
        try:
            store.set(f"failed/{self.rank}", phase)
            missing = self._wait_for_reports(store)
            seen = [self._last_seen(store, r) for r in missing]
        except Exception as exc2:  # the store is gone too (its host died)
            return f"{head}; the job's store cannot be read ({exc2}) to tell which rank is missing"
        if not missing:
            return f"{head}; every rank reported the failure (a lost connection, not a hung rank)"
        return f"{head}; did not arrive: " + "; ".join(f"rank {r} ({s})" for r, s in zip(missing, seen))

    def _wait_for_reports(self, store) -> List[int]:
        others = [r for r in range(self.world) if r != self.rank]
        deadline = time.monotonic() + self.grace_s
        while True:
            missing = [r for r in others if not store.check([f"failed/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)

    @staticmethod
    def _last_seen(store, rank: int) -> str:
        if not store.check([f"progress/{rank}"]):
            return "never seen"
        p = json.loads(store.get(f"progress/{rank}"))
        return f"last seen in {p['phase']}, {p['where']}, {time.time() - p['time']:.0f} s ago"


def reset_peak_memory() -> None:
    """Restart this process's peak resident memory count (Linux ``clear_refs``; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak resident memory since the last ``reset_peak_memory`` (Linux ``VmHWM``; else the process's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def watched(phase: str):
    """Method decorator: run the method inside ``self.watchdog.phase(phase)``."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            with self.watchdog.phase(phase):
                return fn(self, *args, **kwargs)

        return wrapper

    return deco

