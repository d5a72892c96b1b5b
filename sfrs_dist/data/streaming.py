"""Streaming reader: a WebDataset pipeline over the shards of one or more groups.

Pipeline (each step a small function):

    shard list -> [deterministic shuffle by epoch] -> split by rank, then by DataLoader worker
      -> per-shard wds.tarfile_samples (or a sample range), checked against the manifest
      -> decode -> transform

The split works on pieces, i.e. sample ranges of shards, in two levels: the ranks, then each
rank's DataLoader workers. A level hands out whole pieces round-robin (whole shards, read by
streaming the tar) while that leaves the busiest part at most ``BALANCE`` times an even share;
otherwise it cuts the concatenated samples into contiguous near-equal ranges (part ``i`` of
``n`` takes samples ``[i * N // n, (i + 1) * N // n)``). So with fewer shards than ranks (or
than a rank's workers) nobody is idle and the shares differ by at most a sample, and every
sample of the groups is yielded exactly once per pass over all ranks and workers. A rank's
count does not depend on the number of workers (``expected_count``).

Whole shards are read with the library's tar reader and checked against the manifest as they
stream: the keys must come in the recorded order, each sample's digest must match and the
shard must hold exactly the recorded number of samples, so a truncated or tampered shard
raises ``ShardReadError`` naming the shard and the sample instead of making an epoch silently
short. A partial shard is read sample by sample through the manifest index (one ``pread`` of
each sample's byte range, ``random_access.ShardReader``), with the same digest check.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import webdataset as wds
from PIL import Image

from sfrs_dist.data.manifest import IMAGE_EXTS, Manifest, ShardReadError, sample_digest
from sfrs_dist.data.random_access import ShardReader
from sfrs_dist.distributed import get_rank, get_world_size

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Any]


# --------------------------------------------------------------------------- stages
# Stages are small picklable classes: DataLoader workers may be started by spawn/forkserver.
class ShuffleShards:
    """Stage: the same permutation of the shard list on every rank for a given (seed, epoch)."""

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, src: Iterable[Dict]) -> Iterator[Dict]:
        items = list(src)
        random.Random(f"{self.seed}-{self.epoch}").shuffle(items)
        yield from items


#: A split level hands out whole shards while its busiest part gets at most this many times an
#: even share of the samples; sample ranges otherwise.
BALANCE = 1.25


def split_pieces(pieces: Sequence[Dict], part: int, parts: int) -> List[Dict]:
    """Part ``part`` of ``parts`` of a sequence of pieces ``{"url", "start", "stop"}``.

    Whole pieces round-robin (``pieces[part::parts]``) when there are at least ``parts`` of
    them and the busiest part holds at most ``BALANCE`` times ``N / parts`` samples; else the
    samples ``[part * N // parts, (part + 1) * N // parts)`` of the concatenated pieces.
    The parts of ``range(parts)`` together hold every sample exactly once.
    """
    if not 0 <= part < parts:
        raise ValueError(f"part {part} outside {parts} parts (rank outside the world, or worker id)")
    sizes = [p["stop"] - p["start"] for p in pieces]
    total = sum(sizes)
    if len(pieces) >= parts and max(sum(sizes[i::parts]) for i in range(parts)) <= BALANCE * total / parts:
        return list(pieces[part::parts])
    lo, hi = part * total // parts, (part + 1) * total // parts
    out, pos = [], 0
    for p, n in zip(pieces, sizes):
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append({**p, "start": p["start"] + a - pos, "stop": p["start"] + b - pos})
        pos += n
    return out


def rank_pieces(counts: Dict[str, int], urls: Sequence[str], rank: int, world_size: int) -> List[Dict]:
    """The pieces of ``urls`` (in that order) that ``rank`` of ``world_size`` reads."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    pieces = [{"url": u, "start": 0, "stop": counts[Path(u).name]} for u in urls]
    return split_pieces(pieces, rank, world_size)


class SplitPieces:
    """Stage: this rank's, then this DataLoader worker's pieces of the shard list.

    The rank is an argument (not ``RANK`` or the default process group, as for
    ``wds.split_by_node``), so one process can build the loader of any rank; the worker comes
    from ``wds.utils.pytorch_worker_info`` (the DataLoader's worker, or ``WORKER``/``NUM_WORKERS``).
    """

    def __init__(self, manifest: Manifest, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.counts = {name: s.num_samples for name, s in manifest.shards.items()}
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[Dict]) -> Iterator[Dict]:
        mine = rank_pieces(self.counts, [d["url"] for d in src], self.rank, self.world_size)
        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        yield from split_pieces(mine, worker, num_workers)


class CheckedShardSamples:
    """Stage: samples of each piece, checked against the manifest.

    A whole shard streams through ``wds.tarfile_samples``: keys must come in manifest order,
    each sample's digest must match (``verify_digest``) and the shard must hold exactly the
    recorded number of samples. A partial one (``start``/``stop`` inside the shard) is read by
    key through the manifest index (``ShardReader``), digests checked the same way.
    """

    def __init__(self, manifest: Manifest, verify_digest: bool = True):
        self.manifest = manifest
        self.verify_digest = verify_digest
        self._per_shard: Dict[str, Tuple[List[str], Optional[List[str]]]] = {}
        self._reader: Optional[ShardReader] = None

    def _expected(self, url: str) -> Tuple[List[str], Optional[List[str]]]:
        """Keys of the shard at ``url`` in tar order and their digests (None when not verified),
        read from the manifest once per shard."""
        name = Path(url).name
        if name not in self._per_shard:
            digests = self.manifest.shard_digests(name) if self.verify_digest else None
            self._per_shard[name] = (self.manifest.shard_keys(name), digests)
        return self._per_shard[name]

    def __call__(self, src: Iterable[Dict]) -> Iterator[Dict]:
        for item in src:
            n = len(self._expected(item["url"])[0])
            start, stop = item.get("start", 0), item.get("stop", n)
            if (start, stop) == (0, n):
                yield from self._shard(item["url"])
            else:
                yield from self._range(item["url"], start, stop)

    def _range(self, url: str, start: int, stop: int) -> Iterator[Dict]:
        if self._reader is None:  # opened in the process that reads (a DataLoader worker)
            self._reader = ShardReader(self.manifest.root, self.manifest, verify=self.verify_digest)
        for key in self._expected(url)[0][start:stop]:
            yield {"__key__": key, "__url__": url, **self._reader.read_members(key)}

    def _shard(self, url: str) -> Iterator[Dict]:
        expected, digests = self._expected(url)
        n = 0
        last = "(start of shard)"
        member = ["(none)"]

        def track(fname: str) -> str:  # called by the tar reader before reading a member
            member[0] = fname
            return fname

        try:
            for sample in wds.tarfile_samples([{"url": url}], rename_files=track):
                key = sample["__key__"]
                if n >= len(expected) or key != expected[n]:
                    want = expected[n] if n < len(expected) else "(end of shard)"
                    raise ShardReadError(f"shard {url}: sample {n} is {key!r}, manifest expects {want!r}")
                if digests is not None:
                    members = {k: v for k, v in sample.items() if not k.startswith("__")}
                    if sample_digest(members) != digests[n]:
                        raise ShardReadError(
                            f"shard {url}: sample {key} does not match its manifest digest "
                            "(tampered or corrupt shard)"
                        )
                n += 1
                last = key
                yield sample
        except ShardReadError:
            raise
        except Exception as e:
            raise ShardReadError(
                f"shard {url}: read error in member {member[0]} after sample {last} "
                f"({n} of {len(expected)} samples read): {type(e).__name__}: {e.args[0] if e.args else e}"
            ) from e
        if n != len(expected):
            raise ShardReadError(
                f"shard {url}: {n} samples read, manifest says {len(expected)} "
                f"(truncated shard; last sample read {last}, next expected {expected[n]})"
            )


class SeededSampleShuffle:
    """Stage: shuffle buffer seeded by (seed, epoch, rank, DataLoader worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterable[Dict]) -> Iterator[Dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        yield from wds.filters._shuffle(iter(src), bufsize=self.bufsize, initial=self.bufsize, rng=rng)


def decode_image(key: str, data: bytes) -> Optional[Image.Image]:
    """wds decoder handler: ``jpg``/``png`` members to RGB PIL images."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext not in IMAGE_EXTS:
        return None
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class ToItem:
    """Map a decoded wds sample to ``{"key", "image", "meta"}`` with ``transform`` applied."""

    def __init__(self, transform: Optional[Transform]):
        self.transform = transform

    def __call__(self, sample: Dict) -> Dict:
        image = next(sample[e] for e in IMAGE_EXTS if e in sample)
        return {
            "key": sample["__key__"],
            "image": self.transform(image) if self.transform is not None else image,
            "meta": sample["json"],
        }


# --------------------------------------------------------------------------- datasets
def shard_urls(manifest: Manifest, groups: Union[str, Sequence[str]]) -> List[str]:
    """Paths of the shards of ``groups`` (missing files raise ``ShardReadError``)."""
    urls = []
    for name in manifest.group_shards(groups):
        path = manifest.shard_path(name)
        if not path.is_file():
            raise ShardReadError(f"shard {path} listed in the manifest is missing")
        urls.append(str(path))
    return urls


def expected_count(manifest: Manifest, groups: Union[str, Sequence[str]], rank: int, world_size: int,
                   shuffle_seed: Optional[int] = None, epoch: int = 0) -> int:
    """Number of samples a rank yields in one pass (all its DataLoader workers), from the manifest."""
    items: Iterable[Dict] = [{"url": u} for u in shard_urls(manifest, groups)]
    if shuffle_seed is not None:
        items = ShuffleShards(shuffle_seed, epoch)(items)
    counts = {name: s.num_samples for name, s in manifest.shards.items()}
    return sum(p["stop"] - p["start"] for p in rank_pieces(counts, [d["url"] for d in items], rank, world_size))


def make_pass_dataset(
    manifest: Manifest,
    groups: Union[str, Sequence[str]],
    transform: Optional[Transform],
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    shuffle_seed: Optional[int] = None,
    epoch: int = 0,
    sample_shuffle: int = 0,
    verify_digest: bool = True,
) -> wds.DataPipeline:
    """WebDataset pipeline yielding ``{"key", "image", "meta"}`` for one rank.

    Args:
        manifest: loaded manifest (its ``root`` is the shard folder).
        groups: group name(s), e.g. ``"pitts30k_train_db"``.
        transform: applied to the RGB PIL image (None keeps the PIL image).
        rank, world_size: defaults from ``sfrs_dist.distributed``.
        shuffle_seed: None for a pass in manifest order; an int shuffles shards per
            ``(shuffle_seed, epoch)`` identically on every rank.
        epoch: epoch number for the shuffle.
        sample_shuffle: with a shuffle seed, size of a within-worker sample shuffle buffer
            (seeded by seed, epoch, rank and worker); 0 keeps shard order.
        verify_digest: check each sample's digest against the manifest.
    """
    groups = [groups] if isinstance(groups, str) else list(groups)
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    stages: List[Any] = [wds.SimpleShardList(shard_urls(manifest, groups))]
    if shuffle_seed is not None:
        stages.append(ShuffleShards(shuffle_seed, epoch))
    stages += [
        SplitPieces(manifest, rank, world_size),
        CheckedShardSamples(manifest, verify_digest),
    ]
    if shuffle_seed is not None and sample_shuffle > 1:
        stages.append(SeededSampleShuffle(sample_shuffle, shuffle_seed, epoch, rank))
    stages += [wds.decode(decode_image), wds.map(ToItem(transform))]
    return wds.DataPipeline(*stages)


def collate_items(batch: List[Dict]) -> Dict[str, Any]:
    """Batch of items: keys and metas as lists; images stacked when they share a shape."""
    images = [b["image"] for b in batch]
    if all(isinstance(i, torch.Tensor) for i in images) and len({tuple(i.shape) for i in images}) == 1:
        images = torch.stack(images)
    return {"key": [b["key"] for b in batch], "image": images, "meta": [b["meta"] for b in batch]}


def make_pass_loader(
    manifest: Manifest,
    groups: Union[str, Sequence[str]],
    transform: Optional[Transform],
    batch_size: int,
    num_workers: int,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    shuffle_seed: Optional[int] = None,
    epoch: int = 0,
    sample_shuffle: int = 0,
    verify_digest: bool = True,
) -> torch.utils.data.DataLoader:
    """DataLoader over ``make_pass_dataset`` for one rank (see there for the arguments).

    Batches are dicts ``{"key": [..], "image": tensor (B,3,H,W) or list, "meta": [..]}``. Over
    all ranks and workers each sample of ``groups`` comes exactly once; per rank the count is
    ``expected_count(...)``.
    """
    ds = make_pass_dataset(manifest, groups, transform, rank, world_size, shuffle_seed, epoch,
                           sample_shuffle, verify_digest)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_items,
        persistent_workers=False, pin_memory=False,
    )
