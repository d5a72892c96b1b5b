"""Evaluation: top-k search, Recall@N, spatial NMS, PCA whitening, extraction and pictures."""

from sfrs_dist.evaluation.pca import PCAWhitening
from sfrs_dist.evaluation.recall import (
    DEFAULT_NS,
    evaluate_retrieval,
    format_recall_table,
    recall_at_n,
    recall_from_topk,
    recall_table,
    spatial_nms,
)
from sfrs_dist.evaluation.search import merge_topk, search_topk, sharded_search_topk
from sfrs_dist.evaluation.visualize import render_region_similarity, render_retrievals
from sfrs_dist.extraction.descriptors import extract_descriptors, gather_descriptors, order_descriptors

__all__ = [
    "DEFAULT_NS",
    "PCAWhitening",
    "evaluate_retrieval",
    "extract_descriptors",
    "format_recall_table",
    "gather_descriptors",
    "merge_topk",
    "order_descriptors",
    "recall_at_n",
    "recall_from_topk",
    "recall_table",
    "render_region_similarity",
    "render_retrievals",
    "search_topk",
    "sharded_search_topk",
    "spatial_nms",
]
