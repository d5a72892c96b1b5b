"""Progress reports: a bar on a terminal, a few log lines in a log file."""

from __future__ import annotations

import logging

from sfrs_dist.progress import Progress


def test_log_lines_instead_of_redraws_when_not_a_terminal(caplog, monkeypatch):
    clock = iter(range(0, 1000, 4))  # every update is 4 s later
    monkeypatch.setattr("sfrs_dist.progress.time.perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="sfrs_dist.progress"):
        with Progress(100, "extract pitts30k_train_db", unit="img", enabled=True, tty=False, every_s=10) as p:
            for _ in range(10):
                p.update(10)
            p.set_postfix(loss="0.5")
    lines = [r.getMessage() for r in caplog.records]
    # 10 updates over 40 s at one line per 10 s, plus the closing line
    assert 3 <= len(lines) <= 5
    assert lines[0].startswith("extract pitts30k_train_db: ") and "/100 img" in lines[0]
    assert lines[-1].startswith("extract pitts30k_train_db: done, 100/100 img (100%)")
    assert lines[-1].endswith("loss 0.5")


def test_silent_off_rank_zero_and_counts_anyway(caplog):
    with caplog.at_level(logging.INFO, logger="sfrs_dist.progress"):
        with Progress(5, "x", enabled=False, tty=False, every_s=0) as p:
            for _ in range(5):
                p.update()
    assert p.n == 5 and not caplog.records


def test_terminal_gets_a_tqdm_bar_with_the_total(capsys):
    with Progress(7, "teacher", unit="img", enabled=True, tty=True) as p:
        assert p.bar is not None and p.bar.total == 7
        p.update(7)
    assert p.bar is None  # closed
