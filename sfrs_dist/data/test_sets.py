"""Which shard set holds each test split: ``data.shards`` plus the extra ``data.test_shards``.

Split ids (``pitts30k_test``, ``pitts250k_test``, ``tokyo247_test`` ...) name one split of one
shard set. A job trained on ``shards/pitts30k`` can so test every generation on
``tokyo247_test`` from ``shards/tokyo247`` too, each set with its own rules (Tokyo:
aspect-preserving queries, spatial NMS, per-condition recall).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence

from ..config import ConfigError, DataConfig
from .manifest import MANIFEST_NAME, Manifest, ManifestError

log = logging.getLogger(__name__)


def shard_sets(data: DataConfig) -> List[Path]:
    """``data.shards`` first, then ``data.test_shards`` (duplicates dropped)."""
    out: List[Path] = []
    for folder in [data.shards, *data.test_shards]:
        p = Path(folder)
        if p.resolve() not in [q.resolve() for q in out]:
            out.append(p)
    return out


def locate_splits(data: DataConfig, names: Sequence[str]) -> Dict[str, Manifest]:
    """The manifest holding each of ``names``, in the order given.

    Raises ``ConfigError`` naming the split when it is in none of the shard sets or in two,
    and naming the folder when a shard set has no manifest.

    With ``data.test_sets_present_only``, shard folders without a manifest and splits found in
    none of the sets are skipped with a warning instead (ConfigError only if none is left).
    """
    manifests = []
    for folder in shard_sets(data):
        try:
            manifests.append(Manifest.load(folder))
        except ManifestError as exc:
            key = "data.shards" if Path(folder) == Path(data.shards) else "data.test_shards"
            if data.test_sets_present_only and not (Path(folder) / MANIFEST_NAME).exists():
                log.warning("%s: %s is not present: its test sets are skipped", key, folder)
                continue
            raise ConfigError(f"{key}: {exc}") from None
    out: Dict[str, Manifest] = {}
    for name in names:
        hits = [m for m in manifests if name in m.splits]
        if not hits and data.test_sets_present_only:
            log.warning("data.test_sets: %s is in none of the shard sets present: skipped", name)
            continue
        if not hits:
            known = sorted({s for m in manifests for s in m.splits})
            raise ConfigError(f"data.test_sets: split {name!r} is in none of the shard sets "
                              f"{[str(m.root) for m in manifests]} (their splits: {known}); add its shard "
                              "folder to data.test_shards")
        if len(hits) > 1:
            raise ConfigError(f"data.test_sets: split {name!r} is in two shard sets ({hits[0].root}, {hits[1].root}); "
                              "list only one of them in data.shards / data.test_shards")
        out[name] = hits[0]
    if names and not out:
        raise ConfigError(f"data.test_sets: none of {list(names)} is in the shard sets present "
                          f"{[str(m.root) for m in manifests]}")
    return out


def group_by_manifest(located: Dict[str, Manifest]) -> List[tuple]:
    """``[(manifest, [split ids])]`` in first-appearance order, to evaluate set by set."""
    groups: List[tuple] = []
    for sid, m in located.items():
        for g in groups:
            if g[0] is m:
                g[1].append(sid)
                break
        else:
            groups.append((m, [sid]))
    return groups
