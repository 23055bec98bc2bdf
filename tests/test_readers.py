"""Readers, one per source format, on small fixtures written in each exact format (tests/fixtures/<format>/).

Every fixture holds the same 12 interactions (4 users, 5 rated items, one item and one user with a single
interaction) in its native form, so counts agree across formats and k-core has something to remove."""

import gzip
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli_helpers import invoke
from recalign.data import build_dataset, load_dataset
from recalign.data.readers import READERS, _common, read_amazon, read_book_crossing
from recalign.data.registry import detect_format
from recalign.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = ["recbole", "ml-100k-raw", "ml-1m", "amazon", "book-crossing", "steam", "movielens-csv", "csv"]
# positives at each format's default like threshold (3 on 1-5 stars; 5 on Book-Crossing's 1-10; Steam all)
POSITIVES = {"recbole": 7, "ml-100k-raw": 7, "ml-1m": 7, "amazon": 7, "book-crossing": 9, "steam": 12,
             "movielens-csv": 7, "csv": 7}
# the canonical data in the numeric-id formats: (user, item, rating, timestamp) sorted by user, then time
CANONICAL = [
    (1, 1, 5, 100), (1, 2, 3, 200), (1, 3, 4, 200), (1, 4, 1, 300),
    (2, 1, 4, 150), (2, 3, 2, 250), (2, 5, 5, 350),
    (3, 2, 5, 120), (3, 4, 4, 220), (3, 1, 2, 320), (3, 3, 5, 420),
    (10, 1, 3, 500),
]


def read(fmt, **kwargs):
    return load_dataset(str(FIXTURES / fmt), fmt=fmt, like_threshold=kwargs.pop("like_threshold", None), **kwargs)


def raw_rows(ds):
    inter = ds.interactions
    users = ds.users["raw_id"].to_numpy()[inter["user"]]
    items = ds.items["raw_id"].to_numpy()[inter["item"]]
    return list(zip(users, items, inter["rating"], inter["timestamp"]))


def test_every_format_is_registered():
    assert list(READERS) == FORMATS


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_order_and_labels(fmt):
    ds = read(fmt)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (4, 5, 12)
    stats = ds.stats()
    assert stats["positives"] == POSITIVES[fmt] == int(ds.interactions["label"].sum())
    inter = ds.interactions
    assert list(inter.columns) == ["user", "item", "rating", "timestamp", "label"]
    assert inter["user"].dtype == np.int64 and inter["item"].dtype == np.int64
    assert inter["label"].dtype == bool
    assert (inter["label"] == (inter["rating"] > ds.like_threshold)).all()
    # sorted by user, then time; dense ids 0..n-1; every item has a title
    keys = list(zip(inter["user"], inter["timestamp"]))
    assert keys == sorted(keys)
    assert sorted(inter["user"].unique()) == list(range(4)) and sorted(inter["item"].unique()) == list(range(5))
    assert ds.items["raw_id"].is_unique and ds.users["raw_id"].is_unique
    assert len(ds.titles()) == 5 and all(ds.titles())


@pytest.mark.parametrize("fmt", ["recbole", "ml-100k-raw", "ml-1m", "movielens-csv", "csv"])
def test_movielens_formats_agree_on_the_canonical_data(fmt):
    ds = read(fmt)
    # numeric ids sort numerically ("10" after "3"), ties in time keep file order (item 2 before item 3)
    assert ds.users["raw_id"].tolist() == ["1", "2", "3", "10"]
    assert ds.items["raw_id"].tolist() == ["1", "2", "3", "4", "5"]
    assert raw_rows(ds) == [(str(u), str(i), float(r), t) for u, i, r, t in CANONICAL]
    assert ds.items.loc[0, "title"] == "Toy Story" and ds.items.loc[0, "year"] == 1995
    assert ds.items.loc[2, "title"] == "Café Society"  # latin-1 in the raw formats, utf-8 in RecBole
    assert ds.titles()[0] == "Toy Story (1995)"
    assert ds.items.loc[0, "categories"] == ["Animation", "Children's", "Comedy"]
    assert "6" not in ds.items["raw_id"].tolist()  # metadata of a never-rated item is not in the catalogue


def test_recbole_title_year_and_users():
    ds = read("recbole")
    # RecBole's ML-100K keeps "(1995)" in item 1412's title with year "V": the year is split out again
    assert ds.items.loc[3, "title"] == "Land Before Time III: The Time of the Great Giving"
    assert ds.items.loc[3, "year"] == 1995
    assert math.isnan(ds.items.loc[4, "year"]) and ds.titles()[4] == "unknown"
    assert ds.users.columns.tolist() == ["raw_id", "age", "gender", "occupation", "zip_code"]
    assert ds.users.loc[3].tolist() == ["10", 33, "F", "artist", "10003"]
    assert ds.domain == "movie" and ds.name == "tiny"


def test_recbole_prefix_file_and_dotted_names(tmp_path):
    for name in ("tiny.inter", "tiny.item", "tiny.user"):
        shutil.copy(FIXTURES / "recbole" / name, tmp_path / name.replace("tiny", "ml.v2"))
    for path in (tmp_path, tmp_path / "ml.v2", tmp_path / "ml.v2.inter"):
        ds = load_dataset(str(path), fmt="recbole")
        assert ds.name == "ml.v2" and ds.n_items == 5 and ds.users["age"].tolist() == [24, 53, 23, 33]
    shutil.copy(tmp_path / "ml.v2.inter", tmp_path / "other.inter")
    with pytest.raises(InputError, match="several .inter files"):
        load_dataset(str(tmp_path), fmt="recbole")


def test_recbole_without_rating_or_timestamp_is_implicit_in_file_order(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\nb\tq\na\tp\nb\tp\n")
    ds = load_dataset(str(tmp_path), fmt="recbole")
    assert raw_rows(ds) == [("a", "p", 5.0, 1), ("b", "q", 5.0, 0), ("b", "p", 5.0, 2)]
    assert ds.interactions["label"].all() and ds.items["title"].tolist() == ["item p", "item q"]


def test_ml100k_raw_items_and_users():
    ds = read("ml-100k-raw")
    items = ds.items.set_index("raw_id")
    # "(1995) (V)": the year leaves the title, the "(V)" stays
    assert items.loc["4", "title"] == "Land Before Time III: The Time of the Great Giving (V)"
    assert items.loc["4", "year"] == 1995
    assert items.loc["5", "title"] == "Nowhere" and items.loc["5", "year"] == 1997  # from the release date
    assert items.loc["5", "categories"] == ["unknown"]
    assert ds.users.columns.tolist() == ["raw_id", "age", "gender", "occupation", "zip_code"]
    assert ds.users["age"].tolist() == [24, 53, 23, 33] and ds.users["occupation"].tolist()[2] == "writer"


def test_ml1m_items_and_users():
    ds = read("ml-1m")
    items = ds.items.set_index("raw_id")
    assert items.loc["4", "title"] == "City of Lost Children, The" and items.loc["4", "categories"] == ["Adventure", "Sci-Fi"]
    assert items.loc["5", "title"] == "Nowhere" and math.isnan(items.loc["5", "year"])
    assert ds.titles()[4] == "Nowhere"
    users = ds.users.set_index("raw_id")
    assert users.loc["1"].tolist() == ["M", 25, "technician/engineer", "85711"]  # occupation code 17
    assert users.loc["2", "occupation"] == "other" and users.loc["3", "occupation"] == "writer"


def test_ml1m_reads_a_ratings_file_and_titles_with_double_colons(tmp_path):
    shutil.copy(FIXTURES / "ml-1m" / "ratings.dat", tmp_path)
    (tmp_path / "movies.dat").write_bytes(b"1::Film::Noir (1999)::Drama\n2::Two (2000)::Comedy|Drama\n")
    ds = load_dataset(str(tmp_path / "ratings.dat"), fmt="ml-1m")
    assert ds.items.loc[0, "title"] == "Film::Noir" and ds.items.loc[0, "year"] == 1999
    assert ds.users.columns.tolist() == ["raw_id"]  # no users.dat: no features


def test_movielens_csv_quoted_titles_headers_and_bad_lines(tmp_path):
    ds = read("movielens-csv")
    assert ds.items.loc[3, "title"] == "City of Lost Children, The"  # a quoted title with a comma
    assert ds.users.columns.tolist() == ["raw_id"] and ds.name == "movielens-csv"
    shutil.copy(FIXTURES / "movielens-csv" / "ratings.csv", tmp_path)
    movies = tmp_path / "movies.csv"
    movies.write_text('movieId,title,genres\n1,"Toy Story (1995)",(no genres listed)\n2,"Two, ""The"" (2000)",A|B\n')
    ds = load_dataset(str(tmp_path / "ratings.csv"))  # the ratings file itself; the format from its name
    assert ds.items.loc[0, "categories"] == [] and ds.items.loc[1, "title"] == 'Two, "The"'
    assert ds.items.loc[1, "year"] == 2000 and ds.items.loc[1, "categories"] == ["A", "B"]
    bad = {"movieId,title,genres\n1,Toy,Story,A\n": f"{movies}:2: expected 3 comma-separated fields",
           'movieId,title,genres\n\n1,"Toy Story (1995),A\n': f"{movies}:3: not a valid CSV line",
           "movieId,name,genres\n1,Toy Story,A\n": f"{movies}: the first line must be the header movieId,title,genres"}
    for text, error in bad.items():
        movies.write_text(text)
        assert read_error(tmp_path, "movielens-csv").startswith(error), text
    movies.unlink()
    ratings = tmp_path / "ratings.csv"
    lines = ratings.read_text().splitlines()
    for text, error in {"1,1,5.0,100\n": "the first line must be the header userId,movieId,rating,timestamp, found '1,1,5.0,100'",
                        lines[0] + "\n": "file has no data",
                        "\n".join(lines[:3] + lines[:1]) + "\n": ":4: column 'rating' is not a number: 'rating'"}.items():
        ratings.write_text(text)
        assert error in read_error(tmp_path, "movielens-csv"), text


def test_amazon_directory_and_reviews_file():
    ds = read("amazon")
    assert ds.name == "Toys_and_Games_5" and ds.domain == "product"
    assert ds.users["raw_id"].tolist() == ["A1B2C3", "A2XYZ", "A3QQ", "AZZ10"]
    items = ds.items.set_index("raw_id")
    assert items.index.tolist() == ["B0001", "B0002", "B0003", "B0004", "B0005"]
    assert items.loc["B0001", "title"] == "Wooden Train & Tracks"  # HTML entities decoded
    assert items.loc["B0001", "categories"] == ["Toys & Games", "Trains"]
    assert items.loc["B0001", "year"] == 2016 and math.isnan(items.loc["B0002", "year"])
    assert items.loc["B0004", "title"] == "Chess Set"  # first of two metadata lines
    assert items.loc["B0005", "title"] == "item B0005"  # no metadata line
    assert "B9999" not in items.index
    # the reviews file alone finds meta_Toys_and_Games.json.gz beside it (the "_5" suffix dropped)
    again = read_amazon(FIXTURES / "amazon" / "Toys_and_Games_5.json")
    pd.testing.assert_frame_equal(again.interactions, ds.interactions)
    assert again.items["title"].tolist() == ds.items["title"].tolist()


def test_csv_tables_by_column_name_separator_dates_and_errors(tmp_path):
    ds = read("csv")
    assert ds.domain == "item" and ds.users["age"].tolist() == [24, 53, 23, 33]  # numbers stay numbers
    assert ds.users["country"].tolist()[0] == "Lyon, France" and "device" not in ds.interactions
    # a TSV with other header spellings, ISO dates and no rating: implicit positives in time order
    (tmp_path / "interactions.tsv").write_text("UserId\tItemId\tDate\nb\tq\t2024-01-31\na\tp\t2024-01-30T12:00:00Z\n"
                                               'b\t"p"\t2024-01-30\n')
    ds = load_dataset(str(tmp_path))
    assert raw_rows(ds) == [("a", "p", 5.0, 1706616000), ("b", "p", 5.0, 1706572800), ("b", "q", 5.0, 1706659200)]
    assert ds.interactions["label"].all() and ds.titles() == ["item p", "item q"]
    data = tmp_path / "interactions.tsv"
    for text, error in {
        "user\titem\tdate\na\tp\t31/01/2024\n": f"{data}:2: column 'date' is neither Unix seconds nor an ISO date",
        "person\titem\na\tp\n": f"{data}: no user column (one of user_id, userid, user; the header has person, item)",
        "user\titem\tuser_id\na\tp\tb\n": f"{data}: columns user, user_id all name the user; keep one",
        "user\titem\na\tp\tx\n": f"{data}:2: expected 2 fields separated by '\\t', found 3",
        "user\titem\na\tp\nuser\titem\n": f"{data}:3: header line repeated inside the data",
        "user\titem\n": f"{data}: a header but no data",
        "user\titem\trating\na\tp\tfive\n": f"{data}:2: column 'rating' is not a number: 'five'",
        'user\titem\na\t"p\n': f"{data}:2: not a valid delimited line",
    }.items():
        data.write_text(text)
        assert read_error(tmp_path).startswith(error), (text, read_error(tmp_path))
    (tmp_path / "interactions.csv").write_text("user,item\na,p\n")
    assert "several interactions tables (interactions.csv, interactions.tsv)" in read_error(tmp_path, "csv")
    (tmp_path / "interactions.tsv").unlink()
    (tmp_path / "interactions.csv").rename(tmp_path / "export.csv")  # any name, given as the file with --format
    assert raw_rows(load_dataset(str(tmp_path / "export.csv"), fmt="csv")) == [("a", "p", 5.0, 0)]


def test_csv_side_table_lists_each_id_once(tmp_path):
    # an item or user on two rows that differ was silently the first row; identical repeats are harmless
    (tmp_path / "interactions.csv").write_text("user_id,item_id\n1,a\n1,zz\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\nzz,Z\na , A \n")
    (tmp_path / "users.csv").write_text("user_id,age\n1,20\n1,20\n")
    ds = load_dataset(str(tmp_path))
    assert ds.titles() == ["A", "Z"] and ds.users["age"].tolist() == [20]
    (tmp_path / "items.csv").write_text("item_id,title\na,A\nzz,Z\na,A2\n")
    assert read_error(tmp_path) == (f"{tmp_path / 'items.csv'}:4: item 'a' already listed on line 2 with other "
                                    "values; keep one row per item")
    (tmp_path / "items.csv").unlink()
    (tmp_path / "users.csv").write_text("user_id,age\n1,20\n\n1,30\n")
    assert read_error(tmp_path).startswith(f"{tmp_path / 'users.csv'}:4: user '1' already listed on line 2 ")


@pytest.mark.parametrize("fmt", ["csv", "amazon"])
def test_exact_duplicate_interactions_are_read_once_and_density_counts_pairs(fmt, tmp_path, monkeypatch, capsys):
    if fmt == "csv":
        (tmp_path / "interactions.csv").write_text("user_id,item_id,rating,timestamp\n" + "1,a,5,100\n" * 3
                                                   + "1,a,4,100\n1,a,5,200\n1,b,5,100\n")
    else:
        (tmp_path / "x.json").write_text("".join(json.dumps({"reviewerID": "1", "asin": i, "overall": r,
                                                             "unixReviewTime": t}) + "\n"
                                                 for i, r, t in [("a", 5, 100)] * 3 + [("a", 4, 100), ("a", 5, 200),
                                                                                      ("b", 5, 100)]))
    ds = load_dataset(str(tmp_path), fmt=fmt)
    # another rating or another time is another interaction; only the exact repeats go
    assert raw_rows(ds) == [("1", "a", 5.0, 100), ("1", "a", 4.0, 100), ("1", "b", 5.0, 100), ("1", "a", 5.0, 200)]
    monkeypatch.setenv("RECALIGN_DATA_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # a fresh read, then the cached one
        code, out, err = invoke(monkeypatch, capsys, "data", "stats", str(tmp_path), "--format", fmt, "--json")
        stats = json.loads(out)
        assert (stats["interactions"], stats["duplicates_dropped"], stats["density"]) == (4, 2, 1.0), stats
    assert load_dataset(str(tmp_path), fmt=fmt, k_core_users=2).stats()["duplicates_dropped"] == 2


def test_csv_timestamps_mixing_unix_seconds_and_iso_dates_name_both_lines(tmp_path, monkeypatch):
    data = tmp_path / "interactions.csv"
    data.write_text("user_id,item_id,rating,timestamp\n1,a,5,100\n1,b,4,2020-01-01\n")
    assert read_error(tmp_path) == (f"{data}:3: column 'timestamp' mixes Unix seconds (line 2) and ISO dates "
                                    "(line 3); use one")
    data.write_text("user_id,item_id,time\n1,a,2020-01-01\n1,b,100\n1,c,31/01/2020\n")
    assert read_error(tmp_path).startswith(f"{data}:4: column 'time' is neither Unix seconds nor an ISO date")
    # the two kinds in different blocks of a large file
    data.write_text("user_id,item_id,time\n" + "".join(f"1,{i},2020-01-01\n" for i in range(40)) + "2,a,100\n")
    monkeypatch.setattr(_common, "BLOCK_BYTES", 100)
    assert read_error(tmp_path) == (f"{data}:42: column 'time' mixes Unix seconds (line 42) and ISO dates (line 2); "
                                    "use one")


def test_csv_quoted_cells_spanning_lines(tmp_path, monkeypatch):
    (tmp_path / "interactions.csv").write_text('user_id,item_id\n1,a\n1,b\n')
    (tmp_path / "items.csv").write_bytes(b'item_id,title\r\na,"line1\r\n\r\n  line2\r\n"\r\nb,"He said ""hi"""\r\n')
    (tmp_path / "users.csv").write_text('user_id,city\n\n1,"Lyon,\nFrance"\n')
    monkeypatch.setattr(_common, "BLOCK_BYTES", 16)  # a side table is read whole whatever the block size
    ds = load_dataset(str(tmp_path))
    assert ds.titles() == ["line1 line2", 'He said "hi"'] and ds.users["city"].tolist() == ["Lyon, France"]
    (tmp_path / "items.csv").write_text('item_id,title\na,"line1\nline2"\nb,B,x\n')
    assert read_error(tmp_path) == f"{tmp_path / 'items.csv'}:4: expected 2 fields separated by ',', found 3"
    (tmp_path / "items.csv").write_text('item_id,title\na,"open\nb,B\n')
    assert read_error(tmp_path).startswith(f"{tmp_path / 'items.csv'}:2: not a valid CSV line (unexpected end of data)")
    # the interactions table streams in blocks: a cell there must stay on its line
    (tmp_path / "items.csv").unlink()
    (tmp_path / "interactions.csv").write_text('user_id,item_id\n1,a\n1,"b\nc"\n2,a\n')
    assert read_error(tmp_path) == (f"{tmp_path / 'interactions.csv'}:3: a quoted cell runs on to line 4; newlines "
                                    "inside cells are read only in items and users tables (or is a quote left open?)")


def test_csv_dataset_given_as_a_file_is_named_after_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "mydata.txt").write_text("user_id,item_id\n1,a\n")
    (tmp_path / "interactions.csv.gz").write_bytes(gzip.compress(b"user_id,item_id\n1,a\n"))
    code, out, err = invoke(monkeypatch, capsys, "data", "stats", str(tmp_path / "mydata.txt"), "--format", "csv",
                            "--json")
    assert code == 0 and json.loads(out)["name"] == "mydata", err
    assert load_dataset(str(tmp_path / "interactions.csv.gz"), fmt="csv").name == tmp_path.name
    assert load_dataset(str(tmp_path)).name == tmp_path.name


def test_a_carriage_return_inside_a_book_crossing_header_is_a_line_error(tmp_path):
    # found by the fuzzer: the fast path's header parse raised csv.Error ("new-line character seen in unquoted field")
    (tmp_path / "BX-Book-Ratings.csv").write_bytes(b'"User-ID";"ISBN";"Book-Rating"\r\x00\n"1";"2";"5"\n')
    assert read_error(tmp_path, "book-crossing").startswith(f"{tmp_path / 'BX-Book-Ratings.csv'}:1: ")


def test_amazon_2023_release(tmp_path):
    """The 2023 release (user_id, parent_asin, rating, millisecond timestamps; metadata keyed by parent_asin)
    gives the same data as the 2018 fixture it was written from."""
    ds, old = load_dataset(str(FIXTURES / "amazon-2023")), read("amazon")
    assert ds.name == "Toys_and_Games" and ds.domain == "product"
    pd.testing.assert_frame_equal(ds.interactions, old.interactions)  # parent_asin is the item; ms -> s
    assert ds.users["raw_id"].tolist() == old.users["raw_id"].tolist()
    items = ds.items.set_index("raw_id")
    assert items.loc["B0001", "title"] == "Wooden Train & Tracks" and items.loc["B0001", "brand"] == "Brio"
    assert items.loc["B0001", "year"] == 2016 and items.loc["B0003", "year"] == 2001
    assert items.loc["B0001", "categories"] == ["Toys & Games", "Trains"]
    assert items.loc["B0003", "title"] == "item B0003"  # a null title
    assert "B9999" not in items.index
    shutil.copy(FIXTURES / "amazon-2023" / "Toys_and_Games.jsonl", tmp_path)
    with gzip.open(tmp_path / "meta_Toys_and_Games.json.gz", "wb") as handle:
        handle.write(b'{"asin": "B0001", "title": "Train"}\n')
    assert "metadata of the Amazon 2018 release beside reviews of the 2023 release" in read_error(tmp_path)
    (tmp_path / "meta_Toys_and_Games.json.gz").unlink()
    (tmp_path / "Toys_and_Games.jsonl").write_text('{"user_id": "u", "parent_asin": "p", "rating": 5}\n')
    assert read_error(tmp_path) == f"{tmp_path / 'Toys_and_Games.jsonl'}:1: missing key(s) timestamp"


def test_amazon_gzip_reviews_without_metadata(tmp_path):
    data = (FIXTURES / "amazon" / "Toys_and_Games_5.json").read_bytes()
    (tmp_path / "Books.json.gz").write_bytes(gzip.compress(data))
    ds = load_dataset(str(tmp_path / "Books.json.gz"), fmt="amazon")
    assert len(ds.interactions) == 12 and ds.titles()[0] == "item B0001"


def test_book_crossing_ratings_books_users():
    ds = read("book-crossing")
    assert ds.like_threshold == 5.0 and ds.domain == "book"
    assert load_dataset(str(FIXTURES / "book-crossing")).like_threshold == 5.0  # the library's default: the format's
    assert ds.interactions["rating"].tolist() == [10, 6, 8, 2, 8, 4, 10, 10, 8, 4, 10, 6]  # 2 x canonical
    # no timestamps: order is file order (the line number)
    assert ds.interactions["timestamp"].is_unique
    items = ds.items.set_index("raw_id")
    assert "034545104X" in items.index  # lower-case "x" in the ratings file normalised
    assert "9999999999" not in items.index and "0399135782" not in items.index
    assert items.loc["0060973129", "title"] == ("DK Readers: Creating the X-Men, How It All Began "
                                                "(Level 4: Proficient Readers)")  # trailing backslash removed
    assert items.loc["034545104X", "title"].endswith("of 1918 & the Search")
    assert math.isnan(items.loc["034545104X", "year"])  # year "0" = unknown
    assert items.loc["0374157065", "author"] == "Zoë Müller" and items.loc["0195153448", "year"] == 2002
    users = ds.users.set_index("raw_id")
    assert math.isnan(users.loc["1", "age"]) and users.loc["2", "age"] == 18
    assert users.loc["10", "location"] == "porto, v.n.gaia, portugal"


def test_book_crossing_implicit_ratings_on_request():
    ds = read_book_crossing(FIXTURES / "book-crossing", implicit=True)
    assert len(ds.interactions) == 13 and ds.interactions["rating"].min() == 0


def test_steam_reviews_and_games():
    ds = read("steam")
    assert ds.domain == "video game" and ds.interactions["label"].all()
    assert ds.users["raw_id"].tolist() == ["Ariman1", "Chaos Syren", "The_Cpt_FROGGY", "freakfantom"]
    items = ds.items.set_index("raw_id")
    assert items.index.tolist() == ["35140", "35600", "328100", "631920", "725280"]
    assert items.loc["725280", "title"] == "Lost Summoner Kitty" and items.loc["725280", "year"] == 2018
    assert items.loc["631920", "title"] == "Real Pool 3D - Poolians"  # 'title' when 'app_name' is absent
    assert math.isnan(items.loc["631920", "year"])  # "Soon.."
    assert items.loc["35140", "categories"] == ["Action", "Batman"]  # tags when genres are absent
    assert items.loc["35600", "title"] == "item 35600"
    # user "Chaos Syren" reviewed items 2 and 3 on the same day: file order kept
    chaos = ds.interactions[ds.interactions["user"] == 1]
    assert ds.items["raw_id"].to_numpy()[chaos["item"]].tolist() == ["725280", "328100", "35140", "631920"]
    assert chaos["timestamp"].iloc[0] == 1512086400  # 2017-12-01 00:00 UTC


@pytest.mark.parametrize("fmt", FORMATS)
def test_ids_are_stable_across_reads_and_file_order(fmt, tmp_path):
    first, second = read(fmt), read(fmt)
    pd.testing.assert_frame_equal(first.interactions, second.interactions)
    pd.testing.assert_frame_equal(first.items, second.items)
    pd.testing.assert_frame_equal(first.users, second.users)
    # the same lines in another order give the same raw id -> dense id mapping
    copy = tmp_path / fmt
    shutil.copytree(FIXTURES / fmt, copy)
    target = {"recbole": "tiny.inter", "ml-100k-raw": "u.data", "ml-1m": "ratings.dat",
              "amazon": "Toys_and_Games_5.json", "book-crossing": "BX-Book-Ratings.csv",
              "steam": "steam_reviews.json", "movielens-csv": "ratings.csv", "csv": "interactions.csv"}[fmt]
    lines = (copy / target).read_bytes().splitlines(keepends=True)
    head = 1 if fmt in ("recbole", "book-crossing", "movielens-csv", "csv") else 0
    (copy / target).write_bytes(b"".join(lines[:head] + lines[head:][::-1]))
    shuffled = load_dataset(str(copy), fmt=fmt)
    assert shuffled.users["raw_id"].tolist() == first.users["raw_id"].tolist()
    assert shuffled.items["raw_id"].tolist() == first.items["raw_id"].tolist()


def test_id_order_is_total_for_look_alike_ids():
    # "007" and "7" are different ids with the same number: the raw string breaks the tie, so the
    # mapping never depends on set iteration (hash) order
    rows = [("7", "b"), ("007", "a"), ("x", "10"), ("10", "9")]
    frames = []
    for order in (rows, rows[::-1]):
        inter = pd.DataFrame(order, columns=["user_id", "item_id"]).assign(rating=4.0, timestamp=1)
        frames.append(build_dataset("t", inter))
    for ds in frames:
        assert ds.users["raw_id"].tolist() == ["007", "7", "10", "x"]
        assert ds.items["raw_id"].tolist() == ["9", "10", "a", "b"]


@pytest.mark.parametrize("threshold,positives", [(0, 12), (2, 9), (3, 7), (4, 4), (5, 0)])
def test_like_threshold_labels(threshold, positives):
    ds = read("ml-1m", like_threshold=threshold)
    assert ds.stats()["positives"] == positives and ds.like_threshold == threshold
    assert int(ds.with_threshold(threshold).interactions["label"].sum()) == positives


@pytest.mark.parametrize("fmt", FORMATS)
def test_k_core(fmt):
    ds = read(fmt, k_core_users=2, k_core_items=2)
    # item 5 (one rating) goes, then user 10 (one rating); user 2 keeps 2 ratings; nothing else cascades
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (3, 4, 10)
    full = read(fmt)
    kept_users = set(full.users["raw_id"]) - set(ds.users["raw_id"])
    assert len(kept_users) == 1 and ds.meta["k_core"] == [2, 2]
    assert sorted(ds.interactions["user"].unique()) == [0, 1, 2] and sorted(ds.interactions["item"].unique()) == [0, 1, 2, 3]
    # dense ids still point at the right metadata, and the raw rows are a subset of the full data
    assert set(raw_rows(ds)) <= set(raw_rows(full))
    assert ds.items["raw_id"].tolist() == [r for r in full.items["raw_id"] if r in set(ds.items["raw_id"])]
    assert ds.interactions.groupby("user").size().min() >= 2 and ds.interactions.groupby("item").size().min() >= 2


def test_k_core_cascades_and_rejects_bad_thresholds():
    ds = read("recbole", k_core_users=3)  # users 1 (4), 2 (3), 3 (4) stay, then no item filter
    assert ds.n_users == 3 and len(ds.interactions) == 11
    with pytest.raises(InputError, match="removed every interaction"):
        read("recbole", k_core_users=5, k_core_items=5)
    with pytest.raises(InputError, match="k_core_items must be an integer >= 0"):
        read("recbole", k_core_items=-1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_is_detected_from_file_names(fmt):
    assert detect_format(FIXTURES / fmt) == fmt
    ds = load_dataset(str(FIXTURES / fmt))
    assert len(ds.interactions) == 12


def test_file_paths_are_detected_too():
    assert detect_format(FIXTURES / "ml-100k-raw" / "u.data") == "ml-100k-raw"
    assert detect_format(FIXTURES / "amazon" / "Toys_and_Games_5.json") == "amazon"
    assert detect_format(FIXTURES / "steam" / "steam_reviews.json") == "steam"
    with pytest.raises(InputError, match="cannot tell the dataset format"):
        detect_format(FIXTURES / "ml-100k-raw" / "u.genre")


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_data_stats_with_format(fmt, monkeypatch, capsys):
    code, out, err = invoke(monkeypatch, capsys, "data", "stats", str(FIXTURES / fmt), "--format", fmt, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 5, 12)


def test_cli_data_stats_ml100k(monkeypatch, capsys):
    code, out, err = invoke(monkeypatch, capsys, "data", "stats", "ml-100k", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert (stats["users"], stats["items"], stats["interactions"], stats["positives"]) == (943, 1682, 100000, 55375)
    assert stats["like_threshold"] == 3.0


def test_embedded_ml100k_metadata():
    ds = load_dataset("ml-100k")
    assert ds.titles()[0] == "Toy Story (1995)"
    assert ds.titles()[1411] == "Land Before Time III: The Time of the Great Giving (1995)"
    assert ds.items.loc[1411, "year"] == 1995
    assert ds.users.columns.tolist() == ["raw_id", "age", "gender", "occupation", "zip_code"]
    assert ds.items["categories"].map(len).min() >= 1


@pytest.mark.parametrize("fmt,target", [("ml-100k-raw", "u.data"), ("ml-100k-raw", "u.user"),
                                        ("ml-1m", "ratings.dat"), ("ml-1m", "users.dat"),
                                        ("book-crossing", "BX-Book-Ratings.csv"), ("book-crossing", "BX-Books.csv"),
                                        ("movielens-csv", "ratings.csv")])
def test_fast_and_line_by_line_parsers_agree(fmt, target, tmp_path):
    # clean files go through pandas' C parser; a trailing blank line sends them through the line parser
    copy = tmp_path / fmt
    shutil.copytree(FIXTURES / fmt, copy)
    with open(copy / target, "ab") as handle:
        handle.write(b"\n\n")
    fast, slow = read(fmt), load_dataset(str(copy), fmt=fmt, like_threshold=None)
    pd.testing.assert_frame_equal(fast.interactions, slow.interactions)
    pd.testing.assert_frame_equal(fast.items, slow.items)
    pd.testing.assert_frame_equal(fast.users, slow.users)


def test_byte_order_mark_and_crlf_line_ends(tmp_path):
    (tmp_path / "w.inter").write_bytes(b"\xef\xbb\xbfuser_id:token\titem_id:token\trating:float\r\n1\t2\t4\r\n")
    assert raw_rows(load_dataset(str(tmp_path), fmt="recbole")) == [("1", "2", 4.0, 0)]
    (tmp_path / "u.data").write_bytes(b"\xef\xbb\xbf1\t2\t4\t100\r\n1\t3\t2\t200\r\n")
    ds = load_dataset(str(tmp_path / "u.data"), fmt="ml-100k-raw")
    assert raw_rows(ds) == [("1", "2", 4.0, 100), ("1", "3", 2.0, 200)]


# ------------------------------------------------------------------------------------------ bad values
# one good line, then a line with the given user and item ids, in each format; (dataset path, bad file, line)
def write_one_bad_line(fmt, folder: Path, user: str, item: str):
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "recbole":
        target = folder / "t.inter"
        header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        text, line = f"{header}1\t1\t5\t1\n{user}\t{item}\t5\t2\n", 3
    elif fmt == "ml-100k-raw":
        target, text, line = folder / "u.data", f"1\t1\t5\t1\n{user}\t{item}\t5\t2\n", 2
    elif fmt == "ml-1m":
        target, text, line = folder / "ratings.dat", f"1::1::5::1\n{user}::{item}::5::2\n", 2
    elif fmt == "book-crossing":
        target = folder / "BX-Book-Ratings.csv"
        text, line = f'"User-ID";"ISBN";"Book-Rating"\n"1";"1";"5"\n"{user}";"{item}";"5"\n', 3
    elif fmt == "movielens-csv":
        target = folder / "ratings.csv"
        text, line = f"userId,movieId,rating,timestamp\n1,1,5.0,1\n{user},{item},5.0,2\n", 3
    elif fmt == "csv":
        target = folder / "interactions.csv"
        text, line = f"user_id,item_id,rating\n1,1,5\n{user},{item},5\n", 3
    elif fmt == "amazon":
        def review(u, i, t):
            return json.dumps({"reviewerID": u, "asin": i, "overall": 5, "unixReviewTime": t})
        target, text, line = folder / "x.json", review("1", "1", 1) + "\n" + review(user, item, 2) + "\n", 2
    else:
        def review(u, i):
            return repr({"username": u, "product_id": i, "date": "2020-01-01"})
        target, text, line = folder / "reviews.json", review("1", "1") + "\n" + review(user, item) + "\n", 2
    target.write_bytes(text.encode("latin-1" if fmt in ("ml-100k-raw", "ml-1m", "book-crossing") else "utf-8"))
    return folder, target, line


def read_error(path, fmt=None) -> str:
    with pytest.raises(InputError) as info:
        load_dataset(str(path), fmt=fmt)
    return str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", ["1\x00", "\x001", "1\x1f", "a\x0bb", "1\x7f"])
def test_control_characters_in_ids_are_errors_not_phantom_items(fmt, bad, tmp_path):
    # "1\x00" next to "1" used to be a second item (a phantom); now the line is named
    path, target, line = write_one_bad_line(fmt, tmp_path / "d", "1", bad)
    message = read_error(path, fmt)
    assert f"{target}:{line}:" in message and "control character" in message, message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("user", ["", "   "])
def test_empty_and_blank_ids_are_errors(fmt, user, tmp_path):
    path, target, line = write_one_bad_line(fmt, tmp_path / "d", user, "1")
    message = read_error(path, fmt)
    assert message.startswith(f"{target}:{line}: empty "), message


def test_padded_ids_are_the_same_ids(tmp_path):
    path, _, _ = write_one_bad_line("recbole", tmp_path / "d", " 1 ", "1\r")
    ds = load_dataset(str(path), fmt="recbole")
    assert (ds.n_users, ds.n_items) == (1, 1)


@pytest.mark.parametrize("fmt,key,value,shown", [
    ("amazon", "reviewerID", None, "got null"), ("amazon", "asin", True, "got True"),
    ("amazon", "asin", ["a"], "got ['a']"), ("amazon", "reviewerID", 1.5, "got 1.5"),
    ("steam", "username", None, "got None"), ("steam", "product_id", {"a": 1}, "got {'a': 1}"),
])
def test_json_ids_must_be_strings_or_integers(fmt, key, value, shown, tmp_path):
    # a null reviewerID used to become a user called "None"
    record = {"reviewerID": "u", "asin": "a", "overall": 5, "unixReviewTime": 1} if fmt == "amazon" else \
        {"username": "u", "product_id": "a", "date": "2020-01-01"}
    record[key] = value
    name = "x.json" if fmt == "amazon" else "reviews.json"
    (tmp_path / name).write_text((json.dumps(record) if fmt == "amazon" else repr(record)) + "\n")
    assert read_error(tmp_path) == f"{tmp_path / name}:1: '{key}' must be a string or an integer, {shown}"


def test_integer_json_ids_are_read(tmp_path):
    (tmp_path / "x.json").write_text('{"reviewerID": 7, "asin": " b1 ", "overall": 5, "unixReviewTime": 1}\n')
    assert raw_rows(load_dataset(str(tmp_path))) == [("7", "b1", 5.0, 1)]


@pytest.mark.parametrize("fmt,line", [
    ("amazon", '{"reviewerID": "u", "asin": "a", "asin": "b", "overall": 5, "unixReviewTime": 1}'),
    ("steam", "{'username': 'u', 'product_id': 'a', 'date': '2020-01-01', 'username': 'v'}"),
])
def test_duplicate_id_keys_in_a_record_are_errors(fmt, line, tmp_path):
    (tmp_path / "reviews.json").write_text(line + "\n")
    assert "reviews.json:1: duplicate key" in read_error(tmp_path, fmt)


@pytest.mark.parametrize("fmt", ["recbole", "ml-100k-raw", "amazon"])
@pytest.mark.parametrize("stamp", ["1e300", "-1e19", "9223372036854775808"])
def test_timestamps_beyond_int64_are_errors(fmt, stamp, tmp_path):
    path, target, _ = write_one_bad_line(fmt, tmp_path / "d", "1", "2")
    target.write_text(target.read_text().replace("\t2\n", f"\t{stamp}\n").replace('"unixReviewTime": 2}',
                                                                                     f'"unixReviewTime": {stamp}}}'))
    message = read_error(path, fmt)
    assert "timestamp is not an integer within 64 bits" in message and f"{target.name}:" in message, message


def test_form_feed_inside_a_recbole_field_keeps_line_numbers(tmp_path):
    # str.splitlines() broke lines at \x0c and \x1c, so later errors named the wrong line
    (tmp_path / "t.inter").write_bytes(b"user_id:token\titem_id:token\trating:float\n1\t2\x0c\t5\n1\t3\tbad\n")
    assert read_error(tmp_path, "recbole").endswith("t.inter:3: column 'rating' is not a number: 'bad'")


# ------------------------------------------------------------------------------------------ bad files
def amazon_review_line():
    return b'{"reviewerID": "u", "asin": "a", "overall": 5, "unixReviewTime": 1}\n'


@pytest.mark.parametrize("content", [b"\xff\xfe not gzip", amazon_review_line()])
def test_a_gz_name_that_is_not_gzip_says_so(content, tmp_path):
    (tmp_path / "x.json.gz").write_bytes(content)
    for fmt in (None, "amazon"):  # detection reads it too
        assert read_error(tmp_path, fmt) == f"{tmp_path / 'x.json.gz'}: not gzip (the name ends in .gz but the " \
                                            f"file does not start with the gzip magic bytes 1f 8b)"


@pytest.mark.parametrize("magic,kind", [(b"PK\x03\x04", "zip"), (b"BZh91AY&SY", "bzip2"), (b"\xfd7zXZ\x00\x00", "xz")])
def test_other_archives_are_named(magic, kind, tmp_path):
    (tmp_path / "u.data").write_bytes(magic + b"\x00\x01 binary")
    assert read_error(tmp_path, "ml-100k-raw") == (f"{tmp_path / 'u.data'}: {kind}-compressed, not text; "
                                                   f"decompress it first (only gzip is read directly)")


@pytest.mark.parametrize("fmt,name", [("recbole", "t.inter"), ("ml-100k-raw", "u.data"), ("ml-1m", "ratings.dat"),
                                      ("book-crossing", "BX-Book-Ratings.csv"), ("amazon", "x.json"),
                                      ("steam", "reviews.json")])
@pytest.mark.parametrize("detect", [False, True])
def test_a_directory_where_a_file_should_be(fmt, name, detect, tmp_path):
    (tmp_path / name).mkdir()
    (tmp_path / name / "inside").write_text("x")
    message = read_error(tmp_path, None if detect else fmt)
    assert message == f"{tmp_path / name}: is a directory, expected the " + message.split("expected the ")[1]
    assert "not found" not in message


def test_symlink_loops_and_broken_links(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert read_error(tmp_path / "loop") == f"{tmp_path / 'loop'}: symbolic link loop"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.inter").symlink_to("t.inter")
    assert read_error(tmp_path / "d") == f"{tmp_path / 'd' / 't.inter'}: symbolic link loop, expected the RecBole " \
                                         f"atomic file"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "u.data").symlink_to("gone")
    assert read_error(tmp_path / "e") == f"{tmp_path / 'e' / 'u.data'}: broken symbolic link (to gone), expected " \
                                         f"the u.data file"


def test_an_optional_side_file_that_is_a_dead_link_is_not_skipped(tmp_path):
    shutil.copytree(FIXTURES / "ml-100k-raw", tmp_path / "m")
    (tmp_path / "m" / "u.item").unlink()
    (tmp_path / "m" / "u.item").symlink_to("u.item.old")
    assert read_error(tmp_path / "m", "ml-100k-raw") == (f"{tmp_path / 'm' / 'u.item'}: broken symbolic link "
                                                         f"(to u.item.old), expected the u.item file")


def test_a_pipe_is_not_a_file(tmp_path):
    os.mkfifo(tmp_path / "u.data")
    assert read_error(tmp_path, "ml-100k-raw") == (f"{tmp_path / 'u.data'}: not a regular file (a pipe, socket or "
                                                   f"device), expected the u.data file")
    assert read_error(tmp_path / "u.data") == f"{tmp_path / 'u.data'}: not a regular file or a directory (a pipe, " \
                                              f"socket or device)"


def test_an_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    # chmod 000 does not stop root (these tests may run as root): refuse the open itself
    from recalign.data.readers import _common

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    path, target, _ = write_one_bad_line("ml-1m", tmp_path / "d", "1", "2")
    monkeypatch.setattr(_common, "open", refuse, raising=False)
    assert read_error(path, "ml-1m") == f"{target}: cannot read the ratings.dat file (permission denied)"
