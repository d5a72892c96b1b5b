"""Distributed SFRS training for visual place recognition."""

import importlib.util as _importlib_util

if _importlib_util.find_spec("faiss") is None:
    raise ImportError(
        "sfrs_dist needs faiss, which is not installed in this environment: run `source launch/env.sh` "
        "(it picks the build), or `pip install -e '.[cpu]'` (faiss-cpu) or `pip install -e '.[gpu]'` "
        "(faiss-gpu-cu12, CUDA nodes); install only one of the two"
    )
