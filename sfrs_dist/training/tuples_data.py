"""Images of mined training tuples, read by key from the shards (random access).

One ``TupleLoader`` serves all cache subsets of an epoch: its DataLoader workers (persistent
where there are any) start once per epoch, yet the tuples of a subset are only known after
that subset's mining refresh. So the dataset holds no tuples: its sampler does, and hands
every worker ``(seed, tuple)`` items as indices. ``TupleLoader.subset`` sets the sampler's
tuples before each pass, and a worker reads exactly what the sampler sent it, never a stale
copy. Each item seeds its own colour jitter, so the images of a subset do not depend on the
number of workers or on which worker reads which tuple.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.random_access import ShardReader
from ..data.transforms import JITTER, train_resize, train_transform


class TupleImages(torch.utils.data.Dataset):
    """Item ``(seed, tuple)``: the images of the tuple, ``[query, positive, negatives..., difficult...]``.

    Args:
        shard_dir: the shard folder (random access through its manifest index).
        q_keys, db_keys: sample keys of the training split's queries and database images.
        image_size: (H, W) after the training transform (colour jitter + resize).
        jitter: colour jitter (brightness, contrast, saturation, hue) of every tuple image.
        jitter_on_device: leave the jitter to the trainer (``DeviceColorJitter``): images are
            resized ``uint8`` tensors.

    ``seed`` seeds the jitter of the item's images (the process's torch generator is restored).
    """

    def __init__(self, shard_dir: str, q_keys: Sequence[str], db_keys: Sequence[str], image_size: Sequence[int],
                 jitter: Sequence[float] = JITTER, jitter_on_device: bool = False) -> None:
        self.shard_dir = str(shard_dir)
        self.q_keys = list(q_keys)
        self.db_keys = list(db_keys)
        h, w = int(image_size[0]), int(image_size[1])
        self.jitter_on_device = bool(jitter_on_device)
        self.transform = train_resize(h, w) if self.jitter_on_device else train_transform(h, w, jitter)
        self._reader: Optional[ShardReader] = None

    def _image(self, key: str) -> torch.Tensor:
        if self._reader is None:
            self._reader = ShardReader(self.shard_dir)
        img, _ = self._reader.get(key)
        return self.transform(img)

    def __getitem__(self, item: Tuple[int, object]) -> Dict:
        seed, t = item
        keys = [self.q_keys[t.query], self.db_keys[t.positive]]
        keys += [self.db_keys[j] for j in t.negatives]
        keys += [self.db_keys[j] for j in t.difficult_positives]
        if self.jitter_on_device:
            images = [self._image(k) for k in keys]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                images = [self._image(k) for k in keys]
        return {
            "images": torch.stack(images),
            "query": int(t.query),
            "num_negatives": len(t.negatives),
            "difficult": [int(j) for j in t.difficult_positives],
        }


def collate_tuples(items: List[Dict]) -> Dict:
    """A batch: ``images`` (all tuples' images, concatenated in tuple order) and ``tuples``
    (per tuple ``query``, ``num_negatives``, ``difficult``; tuples keep their own image counts).
    One tensor per batch, so the loader pins (and the trainer copies) it in one piece."""
    return {"images": torch.cat([it.pop("images") for it in items]), "tuples": items}


class TupleSampler(torch.utils.data.Sampler):
    """Batches of ``(seed, tuple)`` items of the tuples last set with ``set``, in order."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)
        self.items: List[Tuple[int, object]] = []

    def set(self, tuples: Sequence, seed: int, start: int = 0) -> None:
        """Tuples of the next pass from item ``start`` on; item ``i`` gets the ``i``-th seed drawn from ``seed``."""
        seeds = np.random.SeedSequence(int(seed)).generate_state(max(len(tuples), 1), np.uint64) >> np.uint64(1)
        self.items = [(int(s), t) for s, t in zip(seeds, tuples)][int(start):]

    def __iter__(self) -> Iterator[List[Tuple[int, object]]]:
        for i in range(0, len(self.items), self.batch_size):
            yield self.items[i:i + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)


class TupleLoader:
    """The training images of an epoch's cache subsets, one subset at a time.

    ``workers`` DataLoader workers, persistent across subsets when there are any, started
    through a forkserver: forked from a training process whose communication and compute
    threads may hold locks at that moment, a worker could wait on one of them forever (seen as
    a rank stuck in its first batch); ``pin_memory`` for CUDA training (batches then copy with
    ``non_blocking=True``).
    ``close()`` stops the workers (also on leaving a ``with`` block).
    """

    def __init__(self, dataset: TupleImages, batch_size: int, workers: int, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.sampler = TupleSampler(batch_size)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=int(workers), collate_fn=collate_tuples,
            pin_memory=bool(pin_memory), persistent_workers=int(workers) > 0,
            multiprocessing_context="forkserver" if int(workers) > 0 else None)

    def subset(self, tuples: Sequence, seed: int, start: int = 0) -> Iterator[Dict]:
        """Batches of ``tuples`` (in order, ``batch_size`` each; a shorter last one), jitter seeded by ``seed``.

        ``start``: the first tuple (a resumed pass skips what it trained; the items keep their seeds).
        """
        self.sampler.set(tuples, seed, start)
        return iter(self.loader)

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)  # persistent workers live in the DataLoader's iterator
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None

    def __enter__(self) -> "TupleLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
