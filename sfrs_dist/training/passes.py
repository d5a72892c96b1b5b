"""Distributed passes over a shard group: every rank extracts its part, all ranks get all.

Used by mining refreshes, the teacher pass and evaluation.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from ..data.manifest import Manifest
from ..data.streaming import make_pass_loader
from ..data.transforms import make_transform
from ..evaluation.extract import extract_descriptors, gather_descriptors

log = logging.getLogger(__name__)


def transform_kind(dataset_name: str, aspect_preserving: list, role: str) -> str:
    """Test transform, or the aspect-preserving one for queries of the listed datasets."""
    return "tokyo" if role == "q" and dataset_name in aspect_preserving else "test"


def pass_loader(manifest: Manifest, sid: str, role: str, image_size, batch_size: int, num_workers: int,
                kind: str = "test"):
    """Streaming loader over one role of one split (test transform), split across ranks/workers."""
    group = f"{sid}_{role}"
    transform = make_transform(kind, int(image_size[0]), int(image_size[1]))
    bs = 1 if kind == "tokyo" else batch_size
    return make_pass_loader(manifest, group, transform, batch_size=bs, num_workers=num_workers)


def extract_group(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    manifest: Manifest,
    sid: str,
    role: str,
    image_size,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    kind: str = "test",
    bf16: bool = False,
) -> np.ndarray:
    """Descriptors of every sample of ``<sid>_<role>`` in manifest order, on every rank."""
    loader = pass_loader(manifest, sid, role, image_size, batch_size, num_workers, kind)
    keys, descs = extract_descriptors(
        fn, loader, dim, device, autocast_dtype=torch.bfloat16 if bf16 else None
    )
    return gather_descriptors(keys, descs, manifest.group_keys(f"{sid}_{role}"))


def eval_mode(module: torch.nn.Module):
    """Context that puts ``module`` in eval mode and restores its mode after."""

    class _Ctx:
        def __enter__(self):
            self.was = module.training
            module.eval()
            return module

        def __exit__(self, *exc):
            module.train(self.was)

    return _Ctx()

