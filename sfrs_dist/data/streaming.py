"""Streaming reader: a WebDataset pipeline over the shards of one or more groups.

Pipeline (each step a small function):

    shard list -> [deterministic shuffle by epoch] -> split by rank -> wds.split_by_worker
      -> per-shard wds.tarfile_samples, checked against the manifest -> decode -> transform

Shards, not samples, are split across ranks and DataLoader workers, without wrap-around:
every sample of the groups is yielded exactly once per pass over all ranks and workers, and a
rank or worker left without a shard yields nothing. Each shard is read with the library's tar
reader and checked against the manifest as it streams: the keys must come in the recorded
order, each sample's digest must match and the shard must hold exactly the recorded number of
samples, so a truncated or tampered shard raises ``ShardReadError`` naming the shard and the
sample instead of making an epoch silently short.
"""

from __future__ import annotations

import io
import logging
import random
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import webdataset as wds
from PIL import Image

from sfrs_dist.data.manifest import IMAGE_EXTS, Manifest, ShardReadError, sample_digest
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


class SplitByRank:
    """Stage: shards ``rank, rank + world_size, ...`` (``wds.split_by_node`` with explicit rank).

    ``wds.split_by_node`` takes the rank from ``RANK``/``WORLD_SIZE`` or the default process
    group; taking them as arguments lets one process build the loader of any rank.
    """

    def __init__(self, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterable[Dict]) -> Iterator[Dict]:
        yield from islice(src, self.rank, None, self.world_size)


class CheckedShardSamples:
    """Stage: samples of each shard through ``wds.tarfile_samples``, checked against the manifest.

    Keys must come in manifest order, each sample's digest must match (``verify_digest``) and
    the shard must hold exactly the recorded number of samples.
    """

    def __init__(self, manifest: Manifest, verify_digest: bool = True):
        self.shard_keys = {name: manifest.shard_keys(name) for name in manifest.shards}
        self.digests = {k: e.digest for k, e in manifest.index.items()} if verify_digest else None

    def __call__(self, src: Iterable[Dict]) -> Iterator[Dict]:
        for item in src:
            yield from self._shard(item["url"])

    def _shard(self, url: str) -> Iterator[Dict]:
        expected = self.shard_keys[Path(url).name]
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
                if self.digests is not None:
                    members = {k: v for k, v in sample.items() if not k.startswith("__")}
                    if sample_digest(members) != self.digests[key]:
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


def rank_shards(urls: Sequence[str], rank: int, world_size: int, shuffle_seed: Optional[int] = None,
                epoch: int = 0) -> List[str]:
    """The shards a rank reads (same order as the pipeline), for counting and planning."""
    items: Iterable[Dict] = [{"url": u} for u in urls]
    if shuffle_seed is not None:
        items = ShuffleShards(shuffle_seed, epoch)(items)
    return [d["url"] for d in SplitByRank(rank, world_size)(items)]


def expected_count(manifest: Manifest, groups: Union[str, Sequence[str]], rank: int, world_size: int,
                   shuffle_seed: Optional[int] = None, epoch: int = 0) -> int:
    """Number of samples a rank yields in one pass, from the manifest counts."""
    urls = rank_shards(shard_urls(manifest, groups), rank, world_size, shuffle_seed, epoch)
    return sum(manifest.shards[Path(u).name].num_samples for u in urls)


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
        SplitByRank(rank, world_size),
        wds.split_by_worker,
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
