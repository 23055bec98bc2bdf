"""Evaluation: metrics and ranking protocols."""

from recalign.eval.metrics import auc, check_ks, ctr_metrics, ranking_metrics, target_ranks, uauc

__all__ = ["auc", "check_ks", "ctr_metrics", "ranking_metrics", "target_ranks", "uauc"]
