"""Shard builder and verifier.

``build_shards`` writes standard WebDataset tar shards (one sample = ``<key>.jpg`` or
``<key>.png`` image bytes + ``<key>.json`` metadata) grouped per (dataset, split, role), plus
``manifest.json``. Building is parallel across processes (a spawn-started process pool), deterministic (fixed tar header
fields, fixed member order) and resumable:

- every shard is written under a temporary name and renamed when complete; next to it a small
  ``.shardinfo/<shard>.json`` records what went into it (a digest of its plan), its sha256
  and its per-sample index entries;
- a rerun keeps every shard whose info file matches the current plan and whose sha256
  verifies, and rebuilds missing or corrupt ones;
- the manifest is written last, through a temporary file and ``os.replace``.

Image bytes are stored as they are on disk (JPEG stays JPEG, Tokyo's PNG cutouts stay PNG
under ``<key>.png``); with ``resize`` every image is scaled to fit the given box (oriented
like the image, aspect ratio kept, never enlarged) and stored as JPEG.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from sfrs_dist.data.manifest import (
    IMAGE_EXTS,
    GroupEntry,
    IndexEntry,
    Manifest,
    ManifestError,
    RoleEntry,
    ShardEntry,
    SplitEntry,
    file_sha256,
    group_name,
    sample_digest,
    shard_name,
    split_id,
)
from sfrs_dist.data.records import DATABASE, QUERY, Record, SplitData

log = logging.getLogger(__name__)

INFO_DIR = ".shardinfo"
TAR_MTIME = 0
TAR_USER = "sfrs"
TAR_MODE = 0o444
JPEG_QUALITY = 95
SHARD_FORMAT = 1
"""Version of the shard contents (tar layout, members); part of every shard's plan digest."""
FAIL_AFTER_ENV = "SFRS_SHARDS_FAIL_AFTER"


class BadImageError(ValueError):
    """A raw image that cannot be read or decoded."""


class InjectedFailure(RuntimeError):
    """Raised on purpose (``SFRS_SHARDS_FAIL_AFTER``) to test interrupted builds."""


# --------------------------------------------------------------------------- images
def image_format(data: bytes) -> str:
    """``jpg`` or ``png`` from the magic bytes; raises ``BadImageError`` otherwise."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    raise BadImageError("neither JPEG nor PNG (unknown magic bytes)")


def fit_size(img_h: int, img_w: int, height: int, width: int) -> Tuple[int, int]:
    """Size (h, w) of an image scaled to fit the box ``height x width`` turned like the image.

    The box is used in landscape orientation for landscape images and in portrait orientation
    for portrait ones; the aspect ratio is kept and the image is never enlarged.
    """
    long_box, short_box = max(height, width), min(height, width)
    long_img, short_img = max(img_h, img_w), min(img_h, img_w)
    scale = min(1.0, long_box / long_img, short_box / short_img)
    return max(1, round(img_h * scale)), max(1, round(img_w * scale))


def load_image_bytes(path: str, resize: Optional[Tuple[int, int]] = None) -> Tuple[bytes, str]:
    """Read and check one raw image; returns (bytes to store, extension).

    The image is fully decoded (JPEGs at reduced DCT scale, which still reads every byte of
    the entropy-coded data) so truncated or corrupt files are caught here, not in training.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(f"{path}: cannot read ({e})") from None
    try:
        ext = image_format(data)
        with Image.open(io.BytesIO(data)) as im:
            if resize is None:
                if ext == "jpg":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                return data, ext
            im = im.convert("RGB")
            h, w = fit_size(im.height, im.width, resize[0], resize[1])
            if (h, w) != (im.height, im.width):
                im = im.resize((w, h), Image.BICUBIC)
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=JPEG_QUALITY)
            return out.getvalue(), "jpg"
    except BadImageError as e:
        raise BadImageError(f"{path}: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise BadImageError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ShardTask:
    """One shard to build: its name, group, first position in the group and its records."""

    shard: str
    group: str
    first: int
    records: Tuple[Record, ...]
    ordinal: int


def plan_shards(splits: Sequence[SplitData], shard_size: int) -> List[ShardTask]:
    """Cut every (split, role) into shards of ``shard_size`` records, in .mat order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    tasks: List[ShardTask] = []
    seen_groups = set()
    for s in splits:
        for role, records in ((DATABASE, s.database), (QUERY, s.queries)):
            g = group_name(s.name, s.split, role)
            if g in seen_groups:
                raise ValueError(f"split {s.name} {s.split} given twice")
            seen_groups.add(g)
            for n, first in enumerate(range(0, len(records), shard_size)):
                tasks.append(ShardTask(
                    shard=shard_name(g, n), group=g, first=first,
                    records=tuple(records[first : first + shard_size]), ordinal=len(tasks),
                ))
    return tasks


def plan_digest(task: ShardTask, resize: Optional[Tuple[int, int]], skip_bad: bool) -> str:
    """Digest of everything that determines a shard's bytes (records, source sizes, options)."""
    h = hashlib.sha256()
    h.update(json.dumps({"schema": SHARD_FORMAT, "resize": resize, "quality": JPEG_QUALITY,
                         "skip_bad": skip_bad, "shard": task.shard}).encode())
    for r in task.records:
        try:
            size = os.stat(r.file).st_size
        except OSError:
            size = -1
        h.update(json.dumps([r.meta(), size], sort_keys=True).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- one shard
@dataclass
class ShardResult:
    """What building (or reusing) one shard produced."""

    shard: str
    group: str
    first: int
    num_samples: int
    size: int
    sha256: str
    entries: List[List[Any]]  # [key, offset, size, digest]
    skipped: List[Dict[str, str]]
    plan: str
    reused: bool = False


def _info_path(out_dir: Path, shard: str) -> Path:
    return out_dir / INFO_DIR / f"{shard}.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _reusable(out_dir: Path, task: ShardTask, plan: str) -> Optional[ShardResult]:
    """The recorded result of a shard if its info matches the plan and its sha256 verifies."""
    info = _info_path(out_dir, task.shard)
    tar = out_dir / task.shard
    if not (info.is_file() and tar.is_file()):
        return None
    try:
        res = ShardResult(**json.loads(info.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        return None
    if res.plan != plan or tar.stat().st_size != res.size or file_sha256(tar) != res.sha256:
        log.info("shard %s is stale or corrupt: rebuilding", task.shard)
        return None
    res.reused = True
    return res


def _write_tar(path: Path, samples: List[Tuple[str, Dict[str, bytes]]]) -> List[List[Any]]:
    """Write samples to a deterministic tar; returns index entries [key, offset, size, digest]."""
    entries = []
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                start = tar.offset
                for ext in sorted(members):
                    data = members[ext]
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    ti.mtime = TAR_MTIME
                    ti.mode = TAR_MODE
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = TAR_USER
                    tar.addfile(ti, io.BytesIO(data))
                entries.append([key, start, tar.offset - start, sample_digest(members)])
        f.flush()
        os.fsync(f.fileno())
    return entries


def build_one_shard(task: ShardTask, out_dir: Path, resize: Optional[Tuple[int, int]],
                    skip_bad: bool) -> ShardResult:
    """Build one shard (or reuse a verified one) and record its info file."""
    out_dir = Path(out_dir)
    plan = plan_digest(task, resize, skip_bad)
    reused = _reusable(out_dir, task, plan)
    if reused is not None:
        return reused
    fail_after = os.environ.get(FAIL_AFTER_ENV)
    samples: List[Tuple[str, Dict[str, bytes]]] = []
    skipped: List[Dict[str, str]] = []
    for r in task.records:
        try:
            data, ext = load_image_bytes(r.file, resize)
        except BadImageError as e:
            if not skip_bad:
                raise BadImageError(f"sample {r.key}: {e}") from None
            log.warning("skipping sample %s: %s", r.key, e)
            skipped.append({"key": r.key, "file": r.relpath, "error": str(e).replace(r.file, r.relpath)})
            continue
        meta = json.dumps(r.meta(), sort_keys=True).encode("utf-8")
        samples.append((r.key, {ext: data, "json": meta}))
    tmp = out_dir / f".{task.shard}.tmp-{os.getpid()}"
    if fail_after is not None and task.ordinal >= int(fail_after):
        # leave a partial temporary shard behind, as a killed builder would
        _write_tar(tmp, samples[: len(samples) // 2])
        raise InjectedFailure(f"{FAIL_AFTER_ENV}={fail_after}: failing shard {task.shard}")
    entries = _write_tar(tmp, samples)
    final = out_dir / task.shard
    os.replace(tmp, final)
    res = ShardResult(
        shard=task.shard, group=task.group, first=task.first, num_samples=len(samples),
        size=final.stat().st_size, sha256=file_sha256(final), entries=entries,
        skipped=skipped, plan=plan,
    )
    _atomic_write_text(_info_path(out_dir, task.shard), json.dumps(asdict(res), sort_keys=True))
    return res


def _build_star(args: Tuple[ShardTask, Path, Optional[Tuple[int, int]], bool]) -> ShardResult:
    return build_one_shard(*args)


# --------------------------------------------------------------------------- manifest
def assemble_manifest(splits: Sequence[SplitData], results: Sequence[ShardResult],
                      source: Dict[str, Any], options: Dict[str, Any]) -> Manifest:
    """Manifest from the shard results (skipped samples left out of the key lists)."""
    by_group: Dict[str, List[ShardResult]] = {}
    for r in sorted(results, key=lambda r: r.shard):
        by_group.setdefault(r.group, []).append(r)
    skipped_keys = {s["key"] for r in results for s in r.skipped}
    split_entries: Dict[str, SplitEntry] = {}
    groups: Dict[str, GroupEntry] = {}
    shards: Dict[str, ShardEntry] = {}
    index: Dict[str, IndexEntry] = {}
    skipped: List[Dict[str, Any]] = []
    for s in splits:
        sid = split_id(s.name, s.split)
        cols = {}
        for role, records in ((DATABASE, s.database), (QUERY, s.queries)):
            g = group_name(s.name, s.split, role)
            kept = [r for r in records if r.key not in skipped_keys]
            cols[role] = RoleEntry.from_records(kept)
            pos = 0
            names = []
            for res in by_group.get(g, []):
                shards[res.shard] = ShardEntry(group=g, first=pos, num_samples=res.num_samples,
                                               size=res.size, sha256=res.sha256)
                for key, off, size, dig in res.entries:
                    if cols[role].keys[pos] != key:
                        raise RuntimeError(f"shard {res.shard}: sample {key} out of order")
                    index[key] = IndexEntry(res.shard, off, size, dig)
                    pos += 1
                skipped.extend(res.skipped)
                names.append(res.shard)
            if pos != len(kept):
                raise RuntimeError(f"group {g}: {pos} samples in shards, {len(kept)} expected")
            groups[g] = GroupEntry(split=sid, role=role, shards=names, num_samples=pos)
        split_entries[sid] = SplitEntry(
            name=s.name, split=s.split, pos_dist_thr=float(s.pos_dist_thr),
            nontriv_pos_dist_sq_thr=float(s.nontriv_pos_dist_sq_thr),
            exclude_same_timestamp=bool(s.exclude_same_timestamp),
            database=cols[DATABASE], queries=cols[QUERY],
        )
    return Manifest(source=dict(source), options=dict(options), splits=split_entries,
                    groups=groups, shards=shards, index=index, skipped=skipped)


# --------------------------------------------------------------------------- build
def _remove_stale_temporaries(out_dir: Path) -> None:
    for p in list(out_dir.glob(".*.tmp-*")) + list((out_dir / INFO_DIR).glob(".*.tmp-*")):
        log.info("removing leftover temporary file %s", p)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def build_shards(
    splits: Sequence[SplitData],
    out_dir: Path,
    shard_size: int = 1000,
    workers: int = 1,
    resize: Optional[Tuple[int, int]] = None,
    skip_bad: bool = False,
    source: Optional[Dict[str, Any]] = None,
    progress: bool = True,
) -> Manifest:
    """Build (or complete) a shard set in ``out_dir`` and return its manifest.

    Args:
        splits: the splits to store; each becomes two groups (database, queries).
        out_dir: shard folder (created if needed).
        shard_size: samples per shard.
        workers: processes; ``<= 1`` builds in this process.
        resize: ``(height, width)`` box to store resized JPEGs in, or None for original bytes.
        skip_bad: leave unreadable images out (listed under ``skipped``) instead of failing.
        source: description of the raw data (dataset, root, scale) stored in the manifest.
        progress: report progress (a bar on a terminal, log lines otherwise).

    Raises:
        BadImageError: an image cannot be read or decoded (``skip_bad`` false); the message
            names the sample key and the file.
    """
    from ..progress import Progress

    out_dir = Path(out_dir)
    (out_dir / INFO_DIR).mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    resize = None if resize is None else (int(resize[0]), int(resize[1]))
    tasks = plan_shards(splits, shard_size)
    args = [(t, out_dir, resize, skip_bad) for t in tasks]
    total = sum(len(t.records) for t in tasks)
    results: List[ShardResult] = []
    bar = Progress(total, f"shards -> {out_dir.name}", unit="img", enabled=progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for a in args:
                results.append(_build_star(a))
                bar.update(len(a[0].records))
        else:
            # a process pool that fails (BrokenProcessPool) rather than hangs when a worker dies
            with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_build_star, a) for a in args]
                try:
                    for fut in as_completed(futures):
                        res = fut.result()
                        results.append(res)
                        bar.update(res.num_samples + len(res.skipped))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    reused = sum(r.reused for r in results)
    log.info("%d shards: %d built, %d verified and kept", len(results), len(results) - reused, reused)
    listed = {t.shard for t in tasks}
    for p in sorted(out_dir.glob("*.tar")):
        if p.name not in listed:
            log.warning("%s is not part of this shard set (left in place)", p)
    options = {"shard_size": shard_size, "resize": list(resize) if resize else None,
               "jpeg_quality": JPEG_QUALITY if resize else None}
    manifest = assemble_manifest(splits, results, source or {}, options)
    manifest.save(out_dir)
    return manifest


# --------------------------------------------------------------------------- verify
def count_tar_samples(path: Path) -> Tuple[int, List[str]]:
    """Number of samples (distinct keys) in a tar and the keys in order; raises on bad tars."""
    keys: List[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for ti in tar:
            if not ti.isreg():
                continue
            key = ti.name.split("/")[-1].split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return len(keys), keys


def verify_shards(out_dir: Path) -> List[str]:
    """Check a built set: every shard present, size, sha256 and keys as in the manifest.

    Returns one problem string per bad shard (empty list when the set is sound). A missing,
    malformed or other-version manifest raises ``ManifestError``.
    """
    manifest = Manifest.load(Path(out_dir))
    problems: List[str] = []
    for name, entry in manifest.shards.items():
        path = manifest.shard_path(name)
        if not path.is_file():
            problems.append(f"{name}: missing ({path})")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{name}: size {size} bytes, manifest says {entry.size}")
            continue
        digest = file_sha256(path)
        if digest != entry.sha256:
            problems.append(f"{name}: sha256 {digest[:12]}... does not match manifest {entry.sha256[:12]}...")
            continue
        try:
            n, keys = count_tar_samples(path)
        except (tarfile.TarError, OSError) as e:
            problems.append(f"{name}: unreadable tar ({e})")
            continue
        if n != entry.num_samples or keys != manifest.shard_keys(name):
            problems.append(f"{name}: {n} samples, manifest says {entry.num_samples}")
    for g, entry in manifest.groups.items():
        total = sum(manifest.shards[s].num_samples for s in entry.shards)
        if total != entry.num_samples:
            problems.append(f"group {g}: shards hold {total} samples, manifest says {entry.num_samples}")
    return problems


__all__ = [
    "BadImageError", "InjectedFailure", "ManifestError", "ShardTask", "ShardResult",
    "build_shards", "verify_shards", "plan_shards", "load_image_bytes", "fit_size",
    "count_tar_samples", "IMAGE_EXTS",
]
