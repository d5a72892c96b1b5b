"""The NetVLAD initialisation images: drawn at random from training queries and database."""

from __future__ import annotations

from sfrs_dist.data.manifest import Manifest
from sfrs_dist.training.model_init import init_image_keys


def test_init_images_are_drawn_from_queries_and_database(synthetic_shards):
    manifest = Manifest.load(synthetic_shards)
    split = manifest.split_data("pitts30k_train")
    q_keys = {r.key for r in split.queries}
    db_keys = [r.key for r in split.database]
    n = (len(q_keys) + len(db_keys)) // 2
    keys = init_image_keys(manifest, "pitts30k_train", n, seed=3)
    assert len(keys) == len(set(keys)) == n
    assert init_image_keys(manifest, "pitts30k_train", n, seed=3) == keys  # seeded
    assert init_image_keys(manifest, "pitts30k_train", n, seed=4) != keys
    from_q = sum(k in q_keys for k in keys)
    assert 0 < from_q < n  # both sets contribute
    # not the first database images of the stream, as a sequential read would give
    assert set(keys) != set(db_keys[:n])
    # asking for more than there are gives every image once
    assert len(init_image_keys(manifest, "pitts30k_train", 10 ** 6, seed=0)) == len(q_keys) + len(db_keys)
