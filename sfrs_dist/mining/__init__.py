"""Mining: descriptor stores (dense or sharded across ranks), faiss top-k, k-reciprocal re-ranking from
sparse kNN lists, tuple selection."""

from sfrs_dist.mining.knn import (
                                  gather_inner_products,
                                  merge_topk,
                                  pair_inner_products,
                                  self_farthest,
                                  self_topk,
                                  shard_range,
                                  sharded_topk,
)
from sfrs_dist.mining.rerank import rerank_dense_reference, rerank_pair_distances
from sfrs_dist.mining.store import DenseItems, ShardedItems, as_items
from sfrs_dist.mining.tuples import (
                                  COLLAPSE_SIMILARITY,
                                  KnnGraph,
                                  MiningResult,
                                  MiningTimings,
                                  NegativeCache,
                                  TrainingTuple,
                                  build_knn_graph,
                                  make_negative_sampler,
                                  mean_pair_similarity,
                                  mine_subset,
                                  select_difficult_positives,
                                  select_easiest_positive,
                                  select_hard_negatives,
)

__all__ = [
    "gather_inner_products", "merge_topk", "pair_inner_products", "self_farthest", "self_topk", "shard_range", "sharded_topk",
    "rerank_dense_reference", "rerank_pair_distances",
    "DenseItems", "ShardedItems", "as_items",
    "COLLAPSE_SIMILARITY", "KnnGraph", "MiningResult", "MiningTimings", "NegativeCache", "TrainingTuple", "build_knn_graph", "make_negative_sampler",
    "mean_pair_similarity", "mine_subset",
    "select_difficult_positives", "select_easiest_positive", "select_hard_negatives",
]
