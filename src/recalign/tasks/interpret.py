"""The interpretation probes (RecInterpreter): can a model *say* which items a sequence representation holds?

- `probe_windows(ds, cfg)`: every window of L consecutive interactions of a user, split by the timestamp of
  the window's last item (80/10/10 by count, as the generative protocol); N training windows and bounded
  valid / test draws with a fixed seed. A window row has `history` (the first L-1 items, oldest first) and
  `item` (the L-th): the recovery probe encodes all L, the residual probe encodes List1 = the first L-1 and
  List2 = all L and asks for the L-th.
- `TitleMatcher`: names in a generated text -> catalogue items, by EXACT equality of normalised titles (case,
  accents and punctuation folded; "Usual Suspects, The" = "The Usual Suspects"; the "(year)" and an
  alternative title in parentheses such as "Seven (Se7en)" optional). A list is split at commas, semicolons,
  line breaks and double quotes, and neighbouring pieces are joined again when together they form a title,
  so commas and parentheses inside titles are handled; every other non-empty piece (prose too) counts as a
  named entry that is not a title (the reference counted with a regex built from the raw title, which undercounts titles
  with parentheses).
- `recovery_metrics`: per sequence how many of its items the generation names; the distribution 0..L, the
  mean, and the precision (share of named entries that are distinct items of the sequence).
- `extract_answer`: the text between an answer template's prefix and suffix (what grounding reads).
- `bootstrap_interval`: a 95% percentile bootstrap interval of a mean over cases (scipy);
  `proportion_interval`: the Wilson interval of a share of hits (top-1 / top-5 accuracy: a bootstrap of 0
  hits in 50 is [0, 0], Wilson's is [0, 0.07]); `ratio_interval`: a bootstrap interval of sum(a) / sum(b).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from recalign.data import Dataset, history_samples, temporal_split
from recalign.errors import InputError
from recalign.tasks.ctr import check_split, draw

# the `samples:` section of the probes
PROBE_SAMPLES = {
    "length": 10,  # L: items per encoded sequence (List2); List1 holds the first L-1
    "split": [0.8, 0.1, 0.1],  # windows split by their last item's timestamp
    "train_size": 1024,  # N training windows drawn from the training period (0 = all)
    "valid_size": 32,  # valid windows whose answer loss selects the best projector (0 = all)
    "test_size": 100,  # test windows generated and scored (0 = all)
    "subset_seed": 0,  # fixed, so every encoder and control sees the same valid/test windows
}


def check_probe_samples(cfg: Mapping, where: str = "samples") -> None:
    length = cfg["length"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise InputError(f"{where}.length: expected an integer >= 2 (List1 needs at least one item), got {length!r}")
    for key in ("train_size", "valid_size", "test_size"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 0:
            raise InputError(f"{where}.{key}: expected an integer >= 0 (0 = all), got {cfg[key]!r}")
    check_split(cfg["split"], f"{where}.split")


def probe_windows(ds: Dataset, cfg: Mapping, seed: int) -> dict:
    """{"train_all", "valid_all", "train", "valid", "test"} window frames, "cutoff" (the last training
    timestamp) and "sizes" (of the whole split).

    A user with fewer than L interactions has no window; no window at all is an error naming
    samples.length."""
    length = int(cfg["length"])
    counts = ds.interactions.groupby("user").size()
    if counts.empty or counts.max() < length:
        longest = int(counts.max()) if not counts.empty else 0
        raise InputError(f"samples.length={length}: no user of {ds.name} has that many interactions "
                         f"(the longest history has {longest}); lower samples.length")
    windows = history_samples(ds, length - 1)
    split = temporal_split(windows, tuple(cfg["split"]), by="count").require_parts(f"samples.split {cfg['split']}")
    subset = int(cfg["subset_seed"])
    return {"train_all": split.train, "valid_all": split.valid, "train": draw(split.train, int(cfg["train_size"]), seed),
            "valid": draw(split.valid, int(cfg["valid_size"]), subset),
            "test": draw(split.test, int(cfg["test_size"]), subset),
            "cutoff": int(split.train["timestamp"].max()), "sizes": split.sizes()}


def sequences(frame: pd.DataFrame) -> list[tuple[int, ...]]:
    """The L items of each window, oldest first (history + the last item)."""
    return [tuple(h) + (int(i),) for h, i in zip(frame["history"], frame["item"])]


def other_user_rows(users: Sequence[int]) -> np.ndarray:
    """For each row the next row (cyclically) of ANOTHER user: the shuffled control never reads a window of the
    same user, whose overlapping windows share items. A row stays itself only when every row is one user's."""
    users = np.asarray(users)
    n = len(users)
    out = np.arange(n)
    for i in range(n):
        for step in range(1, n):
            j = (i + step) % n
            if users[j] != users[i]:
                out[i] = j
                break
    return out


# --------------------------------------------------------------------------------------- title matching
ARTICLES = ("the", "a", "an", "le", "la", "les", "l'", "il", "el", "der", "die", "das", "det", "den", "lo", "los",
            "las")
_TRAILING_ARTICLE = re.compile(r"^(?P<base>.+?),\s*(?P<article>" + "|".join(re.escape(a) for a in ARTICLES)
                               + r")$", re.IGNORECASE)
_YEAR = re.compile(r"\s*\((?P<year>\d{4})\)\s*$")
_ALT = re.compile(r"\s*\((?P<alt>[^()]*)\)\s*$")
_SEPARATORS = re.compile(r"(?:\s*(?:[,;\n\"\u201c\u201d]|\s-\s)\s*)+")  # a run of them is one
_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|and\s)\s*", re.IGNORECASE)


def normalise(text: str) -> str:
    """Case, accents and punctuation folded: 'Amélie, The!' -> 'amelie the'; apostrophes vanish
    ("Schindler's" -> "schindlers"), '&' is 'and', every other non-alphanumeric run is one space."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = re.sub(r"['\u2019`]", "", text).replace("&", " and ")
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text).split())


def title_forms(title: str) -> set[str]:
    """Every normalised spelling that names `title`: the base (a trailing ", The" also in front), then the
    alternative title in parentheses and the year, each optional."""
    title = title.strip()
    year = alt = None
    match = _YEAR.search(title)
    if match:
        year, title = match.group("year"), title[:match.start()]
    match = _ALT.search(title)
    if match and match.start() > 0:
        alt, title = match.group("alt"), title[:match.start()]
    bases = {title}
    moved = _TRAILING_ARTICLE.match(title.strip())
    if moved:
        article = moved.group("article")
        joiner = "" if article.endswith("'") else " "
        bases.add(f"{article}{joiner}{moved.group('base')}")
    forms = set()
    for base in bases:
        for alt_part in ({None, alt} if alt else {None}):
            for year_part in ({None, year} if year else {None}):
                form = normalise(" ".join(p for p in (base, alt_part, year_part) if p))
                if form:
                    forms.add(form)
    return forms


class TitleMatcher:
    """Names in generated text -> catalogue item ids, by exact equality of normalised title spellings."""

    MAX_PIECES = 5  # the most comma-separated pieces one title spans ("Good, The Bad and The Ugly, The")

    def __init__(self, titles: Sequence[str]):
        self.forms: dict[str, set[int]] = {}
        for item, title in enumerate(titles):
            for form in title_forms(title):
                self.forms.setdefault(form, set()).add(item)

    def items_named(self, name: str) -> set[int]:
        """The items whose title is exactly `name` (normalised); empty when none is."""
        return set(self.forms.get(normalise(_strip_entry(name)), ()))

    def entries(self, text: str) -> list[tuple[str, set[int]]]:
        """The generated text as a list of named entries, each with the items it names (empty = not a
        title). Pieces between commas are joined back when together they are a title (the longest wins)."""
        pieces = [p for p in _SEPARATORS.split(text)]
        separators = _SEPARATORS.findall(text)
        out, i = [], 0
        while i < len(pieces):
            found = None
            for j in range(min(len(pieces), i + self.MAX_PIECES), i, -1):
                candidate = pieces[i]
                for k in range(i + 1, j):
                    candidate += separators[k - 1] + pieces[k]
                items = self.items_named(candidate)
                if items:
                    found = (j, candidate, items)
                    break
            if found:
                i, name, items = found
                out.append((_strip_entry(name), items))
            else:
                if normalise(_strip_entry(pieces[i])):
                    out.append((_strip_entry(pieces[i]), set()))
                i += 1
        return out


def _strip_entry(text: str) -> str:
    text = _MARKER.sub("", text.strip()).strip()
    return text.strip("\"'\u201c\u201d. ").strip()


def strip_template(text: str, template: str, field: str) -> str:
    """The part of a generation that fills `{field}` in the answer `template` (its other fields filled):
    the text after the template's prefix when it starts with it, up to its suffix when it has it."""
    prefix, _, suffix = template.partition("{" + field + "}")
    body = text.strip()
    prefix, suffix = prefix.strip(), suffix.strip().rstrip(".")
    if prefix and body.casefold().startswith(prefix.casefold()):
        body = body[len(prefix):]
    if suffix:
        cut = body.casefold().find(suffix.casefold())
        if cut >= 0:
            body = body[:cut]
    return body.strip()


def extract_answer(text: str, template: str, field: str) -> str:
    """The one name a generation gives (`strip_template`, first line, quotes removed):
    'This user watched movie X in List2 but not in List1.' -> 'X'."""
    body = strip_template(text, template, field).split("\n", 1)[0]
    return _strip_entry(body)


def named_item_text(matcher: "TitleMatcher", text: str, template: str, field: str) -> str:
    """The name a one-item answer gives: `extract_answer`'s text when it is a title, else the first quoted
    title in the text (a zero-shot answer such as 'The movie in List2 is "Heat".'), else `extract_answer`'s
    text (left to grounding by embedding)."""
    name = extract_answer(text, template, field)
    if matcher.items_named(name):
        return name
    for quoted in re.findall(r'["\u201c]([^"\u201c\u201d]+)["\u201d]', text):
        if matcher.items_named(quoted):
            return quoted.strip()
    return name


# ------------------------------------------------------------------------------------------------ metrics
def recovery_counts(matcher: TitleMatcher, texts: Sequence[str], seqs: Sequence[Sequence[int]],
                    template: str = "", field: str = "titles") -> tuple[np.ndarray, np.ndarray]:
    """(recovered [N]: distinct items of each sequence named in its text, named [N]: entries named, repeats
    included). With an answer `template` its prefix/suffix are removed first."""
    recovered, named = np.zeros(len(texts), np.int64), np.zeros(len(texts), np.int64)
    for n, (text, seq) in enumerate(zip(texts, seqs)):
        body = strip_template(text, template, field) if template else text
        entries = matcher.entries(body)
        wanted, seen = set(int(i) for i in seq), set()
        for _, items in entries:
            seen |= items & wanted
        recovered[n], named[n] = len(seen), len(entries)
    return recovered, named


def recovery_metrics(recovered: np.ndarray, named: np.ndarray, length: int, suffix: str = "") -> dict:
    """recovery_mean (mean titles recovered of L), recovery_precision (recovered / named, over all cases),
    recovery_dist (share of cases recovering exactly k titles, k = 0..L)."""
    recovered, named = np.asarray(recovered), np.asarray(named)
    dist = np.bincount(np.minimum(recovered, length), minlength=length + 1) / max(1, len(recovered))
    return {f"recovery_mean{suffix}": float(recovered.mean()) if len(recovered) else float("nan"),
            f"recovery_precision{suffix}": float(recovered.sum() / named.sum()) if named.sum() else 0.0,
            f"recovery_dist{suffix}": [float(x) for x in dist]}


def residual_metrics(ranks, suffix: str = "") -> dict:
    """residual_top1 / residual_top5 (the added item is the 1st / among the first 5 grounded items) and the
    residual ranking's ndcg@10 / hr@10 (0-based ranks over the catalogue, List1's items excluded)."""
    from recalign.eval import ranking_metrics

    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"residual_top1{suffix}": float((ranks < 1).mean()), f"residual_top5{suffix}": float((ranks < 5).mean())}
    if not suffix:
        metrics = ranking_metrics(ranks, (10,))
        out.update({"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"]})
    return out


def popularity_ranks(popularity: np.ndarray, targets: Sequence[int], excluded: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank of each target when the catalogue is ordered by training popularity (ties count half),
    the case's `excluded` items (List1) not candidates."""
    import torch

    from recalign.eval import target_ranks

    n = len(targets)
    scores = torch.as_tensor(np.asarray(popularity, np.float64)).float().unsqueeze(0).expand(n, -1)
    mask = torch.zeros(n, len(popularity), dtype=torch.bool)
    for row, items in enumerate(excluded):
        mask[row, list(items)] = True
    return target_ranks(scores, torch.as_tensor(np.asarray(targets, np.int64)), mask).numpy()


def bootstrap_interval(values, draws: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean of per-case `values` (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or np.all(values == values[0]):
        value = float(values.mean()) if values.size else float("nan")
        return [value, value]
    result = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=draws, method="percentile",
                       random_state=np.random.default_rng(seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def proportion_interval(hits) -> list[float]:
    """95% Wilson score interval of the share of true values in `hits` (scipy.stats.binomtest)."""
    from scipy.stats import binomtest

    hits = np.asarray(hits, dtype=bool)
    if hits.size == 0:
        return [float("nan"), float("nan")]
    ci = binomtest(int(hits.sum()), int(hits.size)).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def ratio_interval(numerators, denominators, draws: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of sum(numerators) / sum(denominators) over resampled cases (a
    resample whose denominators sum to 0 gives 0, as `recovery_metrics` does)."""
    from recalign.eval.intervals import bootstrap

    a, b = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    if a.size == 0:
        return [float("nan"), float("nan")]
    interval = bootstrap(lambda idx: float(a[idx].sum() / b[idx].sum()) if b[idx].sum() else 0.0, a.size, draws, seed)
    return interval or [float("nan"), float("nan")]
