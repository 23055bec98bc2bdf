"""One reader per source format. Each returns a `Dataset`; each raises `InputError` naming file:line."""

from recalign.data.readers.recbole import read_recbole

READERS = {
    "recbole": read_recbole,
}

__all__ = ["READERS", "read_recbole"]
