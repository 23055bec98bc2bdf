"""The method contract: what a method module declares and what its `run` receives and returns.

A method module (one file per paper method, a recipe over tasks/, cf/, llm/ and eval/) exposes
`METHODS: list[Method]` and `EXPERIMENTS: list[Experiment]` and is listed in `recalign.methods.MODULES`.
The runner resolves and validates the config once (`Method.validate`), loads the dataset, calls
`Method.run(ctx)` and writes the run directory; `run` returns a `RunResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypedDict


class RunResult(TypedDict, total=False):
    """What `Method.run` returns; every other key is copied into metrics.json as it is."""

    test: dict  # metric name -> value on the test cases (lower case: auc, ndcg@10, ...)
    valid: dict  # the same on the validation cases
    seconds: dict  # at least train and eval
    warnings: list  # sentences a reader of metrics.json / report.md must see


@dataclass
class Method:
    name: str
    description: str  # one line for `recalign methods`
    defaults: dict  # every valid config key with its default (the base keys seed/data.* are added)
    run: Callable[["RunContext"], RunResult]
    report: Callable[[dict], str] | None = None  # extra Markdown for report.md from metrics.json
    validate: Callable[[dict], None] | None = None  # raise InputError before anything is written
    nullable: dict[str, Any] = field(default_factory=dict)  # dotted key with a null default -> example value
    moved: dict[str, str] = field(default_factory=dict)  # old dotted key -> its new name (a clear error)
    smoke: dict[str, Any] = field(default_factory=dict)  # --set overrides: seconds on tiny-random (tests)
    # the least the dataset must offer for this config (`recalign.data.Needs`), checked before anything is
    # written: unmet needs are one error, thin-but-valid data becomes warnings in metrics.json / report.md
    needs: Callable[[dict], Any] | None = None


@dataclass
class Experiment:
    """One registered experiment of the seed's tables, in miniature."""

    name: str  # unique, used as the sub-directory
    method: str
    dataset: str = "ml-100k"
    table: str = ""  # which seed table / claim it belongs to
    quick: dict[str, Any] = field(default_factory=dict)  # --set overrides for the quick profile
    full: dict[str, Any] = field(default_factory=dict)  # ... for the full profile
    profiles: tuple[str, ...] = ("quick", "full")


@dataclass
class RunContext:
    """What a method's `run` receives. `run` is the run directory (a checkpoint store: `save_checkpoint`,
    `load_checkpoint`, `checkpoints` path, `write_json`, `log`); components get it only as a store."""

    method: str
    dataset_name: str
    config: dict
    run: Any
    _dataset: Any = None
    recorded: dict = field(default_factory=dict)  # what the runner adds to metrics.json (e.g. "precision")

    @property
    def dataset(self):
        if self._dataset is None:
            from recalign.data import load_dataset

            data = self.config["data"]
            self._dataset = load_dataset(
                self.dataset_name, fmt=data["format"], like_threshold=data["like_threshold"],
                k_core_users=data["k_core_users"], k_core_items=data["k_core_items"], domain=data["domain"],
            )
        return self._dataset

    def backbone(self):
        """The LLM of the config's `model` section; the dtype it runs in, and why, go to metrics.json."""
        from recalign.llm import Backbone

        backbone = Backbone.from_config(self.config["model"])
        self.recorded["precision"] = backbone.precision
        return backbone

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def noun(self) -> str:
        """The domain noun used in prompts ("movie", "book", ...)."""
        return self.config["data"].get("domain") or self.dataset.domain or "item"

    def write_predictions(self, name: str, frame, scores) -> None:
        """A Yes/No run's per-sample test scores ({"user", "item", "label", "score"}), so that runs scored on
        the same samples can be paired (`recalign report --paired`)."""
        import numpy as np

        self.run.write_json(name, {"user": frame["user"].tolist(), "item": frame["item"].tolist(),
                                   "label": frame["label"].astype(int).tolist(),
                                   "score": np.asarray(scores, dtype=np.float64).tolist()})

    def log(self, message: str) -> None:
        from recalign.progress import log

        self.run.log(message)
        log(message)
