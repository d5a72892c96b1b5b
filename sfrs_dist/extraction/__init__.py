"""Distributed extraction passes over a shard group, below every stage that runs a network
over the data (mining refreshes, the teacher pass, evaluation, NetVLAD initialisation).

``descriptors``: the loop over batches and the exactly-once gather by key; ``passes``: the
streaming loader of one split and role, and the gathered or rank-local extraction built on it.
"""
