"""``launch/train.py`` on a disk that fills up at one checkpoint write (for tests/test_resume.py).

The write of the checkpoint named by ``$SFRS_TEST_FULL_DISK_AT`` gets half its bytes onto
the disk and then fails with ENOSPC, as ``torch.save`` does when the file system is full.
"""

from __future__ import annotations

import errno
import os
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TARGET = os.environ["SFRS_TEST_FULL_DISK_AT"]
_save = torch.save


def _save_on_a_full_disk(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and Path(f).name.startswith(f".{TARGET}.tmp"):
        _save(obj, f, *args, **kwargs)
        size = Path(f).stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return _save(obj, f, *args, **kwargs)


torch.save = _save_on_a_full_disk
sys.argv = [str(REPO / "launch" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
