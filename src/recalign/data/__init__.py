"""Datasets, readers, splits and sample builders."""

from recalign.data.checks import Degeneracy, Needs, check_dataset, degeneracy
from recalign.data.dataset import Dataset, build_dataset, k_core
from recalign.data.registry import canonical_dataset, load_dataset
from recalign.data.splits import Split, few_shot, history_samples, leave_one_out, mark_warm_cold, temporal_split

__all__ = [
    "Dataset", "Degeneracy", "Needs", "Split", "build_dataset", "check_dataset", "degeneracy", "few_shot",
    "canonical_dataset", "history_samples", "k_core", "leave_one_out", "load_dataset", "mark_warm_cold", "temporal_split",
]
