"""Evaluation: metrics and ranking protocols."""

from recalign.eval.metrics import auc, ctr_metrics, ranking_metrics, target_ranks, uauc

__all__ = ["auc", "ctr_metrics", "ranking_metrics", "target_ranks", "uauc"]
