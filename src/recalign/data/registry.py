"""Dataset names -> readers. `ml-100k` resolves to the embedded asset; a path uses a reader by format."""

from __future__ import annotations

from pathlib import Path

from recalign import assets
from recalign.data.dataset import Dataset, k_core
from recalign.data.readers import READERS
from recalign.errors import InputError

EMBEDDED = {"ml-100k": ("ml-100k", "ml-100k", "movie")}  # name -> (asset, file prefix, domain)


def load_dataset(
    name_or_path: str,
    fmt: str | None = None,
    like_threshold: float = 3.0,
    k_core_users: int = 0,
    k_core_items: int = 0,
    domain: str | None = None,
) -> Dataset:
    """Load a dataset by embedded name (`ml-100k`) or by path with a reader `fmt`.

    A path without `fmt` is read as RecBole atomic files."""
    if name_or_path in EMBEDDED and fmt is None:
        asset, prefix, default_domain = EMBEDDED[name_or_path]
        directory = assets.fetch(asset)
        ds = READERS["recbole"](directory / prefix, name=name_or_path, like_threshold=like_threshold,
                                domain=domain or default_domain)
    else:
        path = Path(name_or_path)
        if not path.exists():
            known = ", ".join(sorted(EMBEDDED))
            raise InputError(f"unknown dataset '{name_or_path}': not an embedded name ({known}) and no such path")
        fmt = fmt or "recbole"
        if fmt not in READERS:
            raise InputError(f"unknown dataset format '{fmt}'; known formats: {', '.join(sorted(READERS))}")
        kwargs = {"like_threshold": like_threshold}
        if domain:
            kwargs["domain"] = domain
        ds = READERS[fmt](path, **kwargs)
    return k_core(ds, k_core_users, k_core_items)
