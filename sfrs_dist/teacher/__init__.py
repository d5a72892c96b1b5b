"""The teacher of generation g >= 1: one distributed pass of the previous generation's final
network over the training data (``soft_labels``), whose region similarities are cached on
disk keyed by the teacher checkpoint (``cache``), so training steps never run the teacher and
a restart reuses the cache."""

from . import cache
from .soft_labels import cache_key, compute_shard, load_network, run_teacher_pass

__all__ = ["cache", "cache_key", "compute_shard", "load_network", "run_teacher_pass"]
