"""One reader per source format. Each returns a `Dataset`; each raises `InputError` naming file:line.

Every reader is called as `reader(path, name=None, like_threshold=None, domain=...)`; a None threshold
means the format's own default (3 for 1-5 star scales, 5 for Book-Crossing's 1-10)."""

from recalign.data.readers.amazon import read_amazon
from recalign.data.readers.book_crossing import read_book_crossing
from recalign.data.readers.csv_table import read_csv_tables
from recalign.data.readers.ml1m import read_ml1m
from recalign.data.readers.ml100k_raw import read_ml100k_raw
from recalign.data.readers.movielens_csv import read_movielens_csv
from recalign.data.readers.recbole import read_recbole
from recalign.data.readers.steam import read_steam

READERS = {
    "recbole": read_recbole,
    "ml-100k-raw": read_ml100k_raw,
    "ml-1m": read_ml1m,
    "amazon": read_amazon,
    "book-crossing": read_book_crossing,
    "steam": read_steam,
    "movielens-csv": read_movielens_csv,
    "csv": read_csv_tables,
}

__all__ = ["READERS", "read_amazon", "read_book_crossing", "read_csv_tables", "read_ml100k_raw", "read_ml1m", "read_movielens_csv",
           "read_recbole", "read_steam"]
