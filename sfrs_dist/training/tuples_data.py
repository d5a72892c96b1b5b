"""Images of mined training tuples, read by key from the shards (random access)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..data.random_access import ShardReader
from ..data.transforms import JITTER, train_transform


class TupleImages(torch.utils.data.Dataset):
    """Item i: the images of tuple i, ``[query, positive, negatives..., difficult...]``.

    Args:
        shard_dir: the shard folder (random access through its manifest index).
        q_keys, db_keys: sample keys of the training split's queries and database images.
        tuples: mined ``TrainingTuple`` s (query, positive, negatives, difficult positives).
        image_size: (H, W) after the training transform (colour jitter + resize).
        jitter: colour jitter (brightness, contrast, saturation, hue) of every tuple image.
    """

    def __init__(self, shard_dir: str, q_keys: Sequence[str], db_keys: Sequence[str], tuples: Sequence,
                 image_size: Sequence[int], jitter: Sequence[float] = JITTER) -> None:
        self.shard_dir = str(shard_dir)
        self.q_keys = list(q_keys)
        self.db_keys = list(db_keys)
        self.tuples = list(tuples)
        self.transform = train_transform(int(image_size[0]), int(image_size[1]), jitter)
        self._reader = None

    def __len__(self) -> int:
        return len(self.tuples)

    def _image(self, key: str) -> torch.Tensor:
        if self._reader is None:
            self._reader = ShardReader(self.shard_dir)
        img, _ = self._reader.get(key)
        return self.transform(img)

    def __getitem__(self, i: int) -> Dict:
        t = self.tuples[i]
        keys = [self.q_keys[t.query], self.db_keys[t.positive]]
        keys += [self.db_keys[j] for j in t.negatives]
        keys += [self.db_keys[j] for j in t.difficult_positives]
        return {
            "images": torch.stack([self._image(k) for k in keys]),
            "query": int(t.query),
            "num_negatives": len(t.negatives),
            "difficult": [int(j) for j in t.difficult_positives],
        }


def collate_tuples(batch: List[Dict]) -> List[Dict]:
    """Tuples keep their own image counts: a batch is a plain list of items."""
    return batch
