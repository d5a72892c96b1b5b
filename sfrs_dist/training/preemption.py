"""Stopping cleanly when the cluster asks: SIGTERM and SIGUSR1 become a stop at a step boundary.

Slurm sends SIGTERM to every process of a job at preemption and at the time limit, and
SIGUSR1 ahead of it with ``--signal=USR1@<seconds>``. ``StopRequest`` turns either into a
flag; at every step boundary the ranks combine their flags in one CPU all-reduce
(``distributed.any_rank``), so they all stop after the same step, however the signal
reached them. The trainer then saves its exact position (``position_state``: the mined
tuples of the current cache subset, the step within it, the loader's position and every
rank's RNG state) and raises ``Stopped``; ``launch/train.py`` exits with ``STOP_EXIT_CODE``
and rerunning the same command continues from that step.

A rank blocked in a collective or an extraction pass does not reach a step boundary; a
watcher thread, woken by the signal itself (``signal.set_wakeup_fd``), ends the process
with ``STOP_EXIT_CODE + 1`` once ``grace_s`` seconds have passed without a clean stop, so
a job never outlives its grace period. The job then resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import distributed as du

log = logging.getLogger(__name__)

#: Exit code of a job that stopped on a signal after saving its position (EX_TEMPFAIL):
#: ``launch/slurm_train.sh`` requeues the job on it.
STOP_EXIT_CODE = 75
#: Exit code of a process the grace period ran out on before it could save.
GRACE_EXIT_CODE = 76
#: Signals that ask for a clean stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: Environment variable naming a file the stop is recorded in (JSON), for job scripts.
STOP_FILE_ENV = "SFRS_STOP_FILE"


class Stopped(Exception):
    """The job stopped on a signal; ``checkpoint`` (None: nothing saved yet) holds its position."""

    def __init__(self, signal_name: str, checkpoint: Optional[Path], waited_s: float) -> None:
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.waited_s = waited_s
        where = f"position saved in {checkpoint}" if checkpoint else "no checkpoint yet: it restarts from the start"
        super().__init__(f"stopped on {signal_name} {waited_s:.1f} s after it arrived; {where}")


class StopRequest:
    """The process's stop flag, set by ``STOP_SIGNALS`` (one instance per process: ``install``)."""

    _instance: Optional["StopRequest"] = None

    def __init__(self, grace_s: float) -> None:
        self.grace_s = float(grace_s)
        self.signal_name: Optional[str] = None
        self.received_at: Optional[float] = None
        self._done = threading.Event()

    @classmethod
    def install(cls, grace_s: float) -> "StopRequest":
        """Handle ``STOP_SIGNALS`` in this process (main thread); idempotent, updates ``grace_s``."""
        if cls._instance is not None:
            cls._instance.grace_s = float(grace_s)
            return cls._instance
        self = cls(grace_s)
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopRequest.install must run in the main thread")
        r, w = os.pipe()
        os.set_blocking(w, False)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        # the C-level handler writes the signal number here even while the main thread is
        # blocked in a collective, where no Python handler can run
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(r,), name="stop-request", daemon=True).start()
        cls._instance = self
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._note(signum)

    def _note(self, signum: int) -> None:
        if self.received_at is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.monotonic()

    def _watch(self, fd: int) -> None:
        while True:
            data = os.read(fd, 64)
            if not data:
                return
            stops = [b for b in data if b in (int(s) for s in STOP_SIGNALS)]
            if not stops:
                continue
            self._note(stops[0])
            if not self._done.wait(self.grace_s):
                log.error("rank %d: no clean stop %.0f s after %s (blocked in a collective or a pass?); "
                          "exiting with code %d, the job resumes from its last checkpoint",
                          du.get_rank(), self.grace_s, self.signal_name, GRACE_EXIT_CODE)
                logging.shutdown()
                os._exit(GRACE_EXIT_CODE)
            return

    @property
    def requested(self) -> bool:
        """This process received a stop signal."""
        return self.received_at is not None

    def agreed(self) -> bool:
        """True on every rank when any rank received a stop signal (a collective: every rank calls it)."""
        return du.any_rank(self.requested)

    def waited_s(self) -> float:
        """Seconds since the signal arrived here (0 if it came to another rank only)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    def stopped(self, checkpoint: Optional[Path]) -> Stopped:
        """The exception to raise once the position is saved; the grace watcher stands down."""
        self._done.set()
        return Stopped(self.signal_name or "a signal to another rank", checkpoint, self.waited_s())


def rng_state() -> Dict[str, Any]:
    """This process's torch RNG state (CPU, and CUDA when present)."""
    out: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def position_state(tuples: Sequence, subset_step: int, subset_steps: int, epoch_losses: List[float]) -> Dict:
    """The position inside a cache subset, for the checkpoint (a collective: RNG states of every rank).

    ``tuples``: the subset's mined tuples (every rank holds them all); ``subset_step``: steps
    done in it; ``subset_steps``: steps it has; ``epoch_losses``: losses of the epoch so far.
    The loader's position is ``subset_step`` batches into the rank's share of ``tuples``.
    """
    return {"tuples": list(tuples), "subset_step": int(subset_step), "subset_steps": int(subset_steps),
            "epoch_losses": [float(v) for v in epoch_losses], "rng": du.all_gather_object(rng_state()),
            "world_size": du.get_world_size()}


def check_position(position: Dict, path: Path) -> None:
    """Raise ``RuntimeError`` if ``position`` (from checkpoint ``path``) was saved by another world size."""
    if position["world_size"] != du.get_world_size():
        raise RuntimeError(f"{path} stopped inside a cache subset with {position['world_size']} ranks; it resumes "
                           f"with the same number only (this job has {du.get_world_size()})")


def write_stop_record(stop: Stopped, path: Optional[str] = None) -> None:
    """Record the stop as JSON at ``path`` (default: ``$SFRS_STOP_FILE``; nothing if unset)."""
    path = path or os.environ.get(STOP_FILE_ENV)
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"exit_code": STOP_EXIT_CODE, "signal": stop.signal_name,
                               "checkpoint": str(stop.checkpoint) if stop.checkpoint else None,
                               "seconds_to_stop": round(stop.waited_s, 3), "time": time.time()}) + "\n")
    os.replace(tmp, path)
