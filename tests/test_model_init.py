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


def test_init_descriptor_sample_does_not_depend_on_batching():
    """Each image's positions come from its own seed: the same sample whether the images are read
    in one batch or split (as across ranks); one shared generator drew different positions."""
    import torch

    from sfrs_dist.models import build_model, sample_local_descriptors
    from sfrs_dist.training.model_init import seed_for_image

    torch.manual_seed(0)
    net = build_model("smallcnn", num_clusters=4).eval()
    images = torch.randn(4, 3, 48, 64)
    seeds = [seed_for_image(42, i) for i in range(4)]
    with torch.no_grad():
        whole = sample_local_descriptors(net.features, images, 5, image_seeds=seeds)
        split = torch.cat([sample_local_descriptors(net.features, images[:1], 5, image_seeds=seeds[:1]),
                           sample_local_descriptors(net.features, images[1:], 5, image_seeds=seeds[1:])])
        torch.testing.assert_close(whole, split)
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        shared = torch.cat([sample_local_descriptors(net.features, images[:1], 5, generator=g1),
                            sample_local_descriptors(net.features, images[1:], 5, generator=g2)])
        assert not torch.allclose(shared, sample_local_descriptors(net.features, images, 5,
                                                                   generator=torch.Generator().manual_seed(1)))
