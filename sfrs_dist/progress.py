"""Progress of long passes, readable in a terminal and in a log file alike.

On a terminal (stderr is a TTY) a tqdm bar with a total; otherwise (CI, ``> log``) one log
line every ``every_s`` seconds and one when the pass ends, instead of thousands of bar
redraws. Only rank 0 reports; elsewhere the object counts silently.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

from . import distributed as du

log = logging.getLogger("sfrs_dist.progress")

#: Seconds between two progress lines when output is not a terminal.
LOG_EVERY_S = 15.0


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``with Progress(total, desc, unit) as p: ... p.update(n)``.

    Args:
        total: expected count (None if unknown).
        desc: what the pass is, e.g. ``extract pitts30k_train_db``.
        unit: what is counted (``img``, ``step``).
        enabled: report at all (default: on rank 0 only).
        tty: bar (True) or log lines (False); default: whether stderr is a terminal.
        every_s: seconds between log lines when not a terminal.
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", enabled: Optional[bool] = None,
                 tty: Optional[bool] = None, every_s: float = LOG_EVERY_S) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = du.is_main_process() if enabled is None else enabled
        self.tty = _is_tty() if tty is None else tty
        self.every_s = every_s
        self.n = 0
        self.postfix = ""
        self.t0 = self.t_last = time.perf_counter()
        self.bar: Any = None
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(ok=exc[0] is None)

    def _line(self, done: bool) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        head = "done, " if done else ""
        return (f"{self.desc}: {head}{self.n}{of} {self.unit}{pct} in {elapsed:.0f} s, "
                f"{self.n / elapsed:.1f} {self.unit}/s{tail}")

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.t_last >= self.every_s:
            self.t_last = now
            log.info(self._line(done=False))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix, refresh=False)

    def close(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and ok and self.n and time.perf_counter() - self.t0 >= 1.0:
            log.info(self._line(done=True))
        self.enabled = False
