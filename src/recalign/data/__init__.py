"""Datasets, readers, splits and sample builders."""

from recalign.data.dataset import Dataset, build_dataset, k_core
from recalign.data.registry import load_dataset
from recalign.data.splits import Split, few_shot, history_samples, leave_one_out, mark_warm_cold, temporal_split

__all__ = [
    "Dataset", "Split", "build_dataset", "few_shot", "history_samples", "k_core", "leave_one_out",
    "load_dataset", "mark_warm_cold", "temporal_split",
]
