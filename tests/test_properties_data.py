"""Property tests: random and malformed dataset files through the real CLI (`recalign data stats PATH --json`).

The contract on any input: exit 0 with one JSON object on stdout and nothing on stderr, or exit 2 with
exactly one stderr line `error: ...` that names the dataset path (never exit 1, never a traceback). A file
that loads must give clean ids: stripped, non-empty, no control characters.

Bounded for CI: 120 examples per test (600 in all, about 10 CPU-seconds), no deadline, no example database
written into the tree.
"""

import gzip
import itertools
import json
import os
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cli_helpers import invoke
from recalign.data import load_dataset

# RECALIGN_PROPERTY_EXAMPLES=5000 for a longer hunt than CI's bounded run
SETTINGS = settings(max_examples=int(os.environ.get("RECALIGN_PROPERTY_EXAMPLES", "120")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# ------------------------------------------------------------------------------------------ strategies
ODD_CELLS = ["", " ", "\t", "nan", "inf", "-inf", "1e300", "-1e19", "9223372036854775808", "1.5", "NULL", "None",
             "\x00", "1\x00", " 1 ", "\xa0", "\ufeff1", "\x1c", "1\x0c", "é", "💥", '"', "::", ";", "|", "\\"]
cells = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(ODD_CELLS), st.text(max_size=6),
                  st.floats().map(repr))
small_ids = st.integers(1, 6).map(str)


def rarely(odd, usual, one_in: int = 12):
    """`odd` about once in `one_in` draws, else `usual`: most files get deep into parsing before failing."""
    return st.integers(1, one_in).flatmap(lambda k: odd if k == 1 else usual)


ids = rarely(st.sampled_from(ODD_CELLS) | st.text(max_size=4), small_ids, 20)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
                           | st.sampled_from([2 ** 64, -2 ** 63 - 1, 10 ** 400]),
                           lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner,
                                                                                       max_size=2),
                           max_leaves=4)


def good_row(width: int):
    """A row that parses: ids, a 1..5 rating, a timestamp (padded to `width` cells)."""
    return st.tuples(ids, ids, rarely(cells, st.integers(1, 5).map(str), 30),
                     rarely(cells, st.integers(0, 10**9).map(str), 30),
                     st.lists(st.just("x"), min_size=max(0, width - 4), max_size=max(0, width - 4))
                     ).map(lambda t: [*t[:4], *t[4]][:width])


def rows_of(width: int):
    bad_row = st.lists(cells, min_size=max(0, width - 1), max_size=width + 1)
    return st.lists(rarely(bad_row, good_row(width), 15), max_size=8)


@st.composite
def mutated(draw, text: str, encodings=("utf-8",)) -> bytes:
    """Encode `text` (often in the format's own encoding, sometimes not), then maybe add a BOM, CRLF line
    ends, random bytes somewhere, a truncation."""
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    data = text.encode(draw(rarely(st.sampled_from(["utf-16", "cp1252", "utf-8"]), st.sampled_from(encodings), 8)),
                       errors="replace")
    if draw(st.integers(0, 9)) == 0:
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 6)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    if draw(st.integers(0, 6)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@st.composite
def recbole_inter(draw) -> bytes:
    if draw(st.integers(0, 4)):
        columns = draw(st.sampled_from([["user_id", "item_id"], ["user_id", "item_id", "rating"],
                                        ["user_id", "item_id", "rating", "timestamp"],
                                        ["item_id", "user_id", "rating", "timestamp", "x"]]))
        header = [f"{c}:{'float' if c in ('rating', 'timestamp') else 'token'}" for c in columns]
    else:  # random header types and names, repeated columns, missing colons
        name = st.sampled_from(["user_id", "item_id", "rating", "timestamp", "title"]) | st.text(max_size=4)
        kind = st.sampled_from(["token", "token_seq", "float", "float_seq"]) | st.text(max_size=4)
        header = draw(st.lists(st.tuples(name, st.sampled_from([":", ":", "", " : "]), kind).map("".join),
                               min_size=1, max_size=5))
    sep = draw(rarely(st.sampled_from([",", " ", "\t\t"]), st.just("\t"), 10))
    rows = draw(rows_of(len(header)))
    lines = [sep.join(header)] + [sep.join(row) for row in rows]
    if draw(st.integers(0, 5)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", " ", sep.join(header)])))
    return draw(mutated("\n".join(lines) + draw(st.sampled_from(["\n", ""]))))


@st.composite
def amazon_reviews(draw) -> bytes:
    lines = []
    release = draw(st.sampled_from(["2018", "2023"]))  # the two releases' key names; the first record decides
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 20)) == 0:
            release = "2023" if release == "2018" else "2018"  # a file mixing both
        if release == "2018":
            record = {"reviewerID": draw(ids), "asin": draw(ids), "overall": draw(st.integers(1, 5)),
                      "unixReviewTime": draw(st.integers(0, 10**9))}
        else:
            record = {"user_id": draw(ids), "parent_asin": draw(ids), "rating": draw(st.floats(1, 5)),
                      "timestamp": draw(st.integers(0, 10**12))}
        key = draw(st.sampled_from(list(record)))
        mutation = draw(st.integers(0, 15))
        if mutation == 0:
            record[key] = draw(json_values)
        elif mutation == 1:
            del record[key]
        line = json.dumps(record)
        choice = draw(st.integers(0, 30))
        if choice == 0:
            line = line[:draw(st.integers(0, len(line)))]  # a truncated object
        elif choice == 1:
            line = json.dumps(draw(json_values))  # valid JSON, not an object
        elif choice == 2 and record.get("asin") is not None:
            line = line[:-1] + f', "asin": {json.dumps(draw(json_values))}}}'  # a duplicate key
        elif choice == 3 and key in record:  # a huge number (past float, or past Python's 4300-digit limit)
            line = json.dumps({**record, key: "@"}).replace('"@"', "1" + "0" * draw(st.sampled_from([400, 5000])))
        elif choice == 4:
            line = line[:-1] + ', "x": ' + "[" * 50000 + "]" * 50000 + "}"  # nested past the recursion limit
        lines.append(line)
    return draw(mutated("\n".join(lines) + "\n"))


@st.composite
def delimited(draw, fmt=None):
    """(format, file name, bytes) for the line formats: ML-100K raw, ML-1M, Book-Crossing, Steam."""
    fmt = fmt or draw(st.sampled_from(["ml-100k-raw", "ml-1m", "book-crossing", "steam", "movielens-csv", "csv"]))
    if fmt == "steam":
        lines = []
        for _ in range(draw(st.integers(0, 5))):
            record = {"username": draw(ids), "product_id": draw(ids),
                      "date": draw(rarely(st.sampled_from(["2020-13-01", "", "1/1/2020"]), st.just("2020-01-01")))}
            if draw(st.integers(0, 15)) == 0:
                record[draw(st.sampled_from(list(record)))] = draw(json_values)
            lines.append(draw(rarely(st.text(max_size=12), st.just(repr(record)), 20)))
        return fmt, "steam_reviews.json", draw(mutated("\n".join(lines) + "\n"))
    sep, name = {"ml-100k-raw": ("\t", "u.data"), "ml-1m": ("::", "ratings.dat"),
                 "book-crossing": (";", "BX-Book-Ratings.csv"), "movielens-csv": (",", "ratings.csv"),
                 "csv": (draw(st.sampled_from([",", "\t", ";"])), "interactions.csv")}[fmt]
    rows = draw(rows_of(4 if fmt != "book-crossing" else 3))
    if fmt == "book-crossing":
        quote = lambda cell: cell if draw(st.integers(0, 30)) == 0 else f'"{cell}"'  # noqa: E731
        lines = ['"User-ID";"ISBN";"Book-Rating"'] + [";".join(quote(c) for c in row[:3]) for row in rows]
    elif fmt == "movielens-csv":
        header = draw(rarely(st.sampled_from(["", "userId,movieId,rating", "user,item,rating,time"]),
                             st.just("userId,movieId,rating,timestamp"), 15))
        lines = [header] + [sep.join(row) for row in rows]
    elif fmt == "csv":
        header = draw(rarely(st.sampled_from(["user", "user,user_id,item", "User_Id,ItemId,Score,Date", ""]),
                             st.just("user_id,item_id,rating,timestamp"), 15)).replace(",", sep)
        quote = lambda cell: f'"{cell}"' if draw(st.integers(0, 20)) == 0 else cell  # noqa: E731
        lines = [header] + [sep.join(quote(c) for c in row) for row in rows]
        if draw(st.integers(0, 10)) == 0:  # ISO dates in the time column
            lines = [line.rsplit(sep, 1)[0] + sep + draw(st.sampled_from(["2024-01-31", "2024-13-01", "x"]))
                     for line in lines[:1]] + lines[1:]
    else:
        lines = [sep.join(row) for row in rows]
    return fmt, name, draw(mutated("\n".join(lines) + "\n", ("latin-1",)))


@st.composite
def table(draw, good: list, sep: str, header: str = "", quote: bool = False) -> str:
    """Lines of `good` cells (each rarely replaced by an odd one), now and then a line of random cells."""
    lines = [header] if header else []
    for _ in range(draw(st.integers(0, 5))):
        row = [draw(rarely(cells, cell, 15)) for cell in good]
        if draw(st.integers(0, 15)) == 0:
            row = draw(st.lists(cells, max_size=len(good) + 1))
        lines.append(sep.join(f'"{c}"' if quote else c for c in row))
    return "\n".join(lines) + "\n"


titles = st.sampled_from(["Toy Story (1995)", "X (V)", "", "A (1999) (V)", "&amp; <b>", "Title (19x5)"])
years = st.sampled_from(["1995", "0", "", "V", "1e300", "nan", "01-Jan-1995"])
flags = [st.sampled_from(["0", "1"])] * 19
lists = st.lists(st.text(max_size=3), max_size=2)
SIDE_FILES = {  # format -> {file name: its lines}; the main file comes from the format's own strategy
    "recbole": {
        "t.item": table([ids, titles, years, st.just("Drama Comedy")], "\t",
                        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"),
        "t.user": table([ids, years, st.sampled_from(["M", "F"])], "\t", "user_id:token\tage:token\tgender:token")},
    "ml-100k-raw": {"u.item": table([ids, titles, years, st.just(""), st.just("http://x"), *flags], "|"),
                    "u.user": table([ids, years, st.just("M"), st.just("writer"), st.just("12345")], "|")},
    "ml-1m": {"movies.dat": table([ids, titles, st.sampled_from(["Drama|War", "(no genres listed)", ""])], "::"),
              "users.dat": table([ids, st.just("F"), years, st.sampled_from(["0", "20", "21", "-1", "1e300"]),
                                  st.just("12345")], "::")},
    "book-crossing": {
        "BX-Books.csv": table([ids, titles, st.just("Author"), years, st.just("Pub")], ";",
                              '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher"', quote=True),
        "BX-Users.csv": table([ids, st.just("nyc, usa"), years], ";", '"User-ID";"Location";"Age"', quote=True)},
    "movielens-csv": {"movies.csv": table([ids, titles, st.sampled_from(["Drama|War", "(no genres listed)", ""])], ",",
                                          "movieId,title,genres")},
    "csv": {"items.csv": table([ids, titles, st.sampled_from(["Drama|War", ""])], ",", "item_id,title,genres"),
            "users.csv": table([ids, years, st.just("x,y")], ",", "user_id,age,country")},
    "amazon": {"meta_x.json": st.lists(st.fixed_dictionaries(
        {"asin": rarely(json_values, ids, 20), "title": rarely(json_values, titles, 20),
         "category": rarely(json_values, lists, 20), "date": st.sampled_from(["September 13, 2016", "", "2016"])}
    ).map(json.dumps), max_size=4).map(lambda lines: "\n".join(lines) + "\n") | st.lists(st.fixed_dictionaries(
        {"parent_asin": rarely(json_values, ids, 20), "title": rarely(json_values, titles, 20),
         "categories": rarely(json_values, lists, 20), "store": rarely(json_values, titles, 20),
         "details": rarely(json_values, st.fixed_dictionaries({"Date First Available": years}), 20)}
    ).map(json.dumps), max_size=4).map(lambda lines: "\n".join(lines) + "\n")},
    "steam": {"steam_games.json": st.lists(st.fixed_dictionaries(
        {"id": rarely(json_values, ids, 20), "app_name": rarely(json_values, titles, 20),
         "genres": rarely(json_values, lists, 20), "release_date": st.sampled_from(["2017-01-01", "", "soon"])}
    ).map(repr), max_size=4).map(lambda lines: "\n".join(lines) + "\n")},
}
MAIN_FILES = {"recbole": "t.inter", "ml-100k-raw": "u.data", "ml-1m": "ratings.dat",
              "book-crossing": "BX-Book-Ratings.csv", "amazon": "x.json", "steam": "steam_reviews.json",
              "movielens-csv": "ratings.csv", "csv": "interactions.csv"}


@st.composite
def dataset_with_side_files(draw):
    """(format, {file name: bytes}): a main file that mostly parses, plus some of the format's side files."""
    fmt = draw(st.sampled_from(sorted(SIDE_FILES)))
    if fmt == "recbole":
        main = draw(recbole_inter())
    elif fmt == "amazon":
        main = draw(amazon_reviews())
    else:
        main = draw(delimited(fmt))[2]
    encoding = "latin-1" if fmt in ("ml-100k-raw", "ml-1m", "book-crossing") else "utf-8"
    files = {MAIN_FILES[fmt]: main}
    for name, lines in SIDE_FILES[fmt].items():
        if draw(st.integers(0, 3)):
            files[name] = draw(mutated(draw(lines), (encoding,)))
    return fmt, files


# ------------------------------------------------------------------------------------------ the contract
def check_contract(monkeypatch, capsys, folder: Path, target: str, fmt: str | None):
    args = ["data", "stats", target] + (["--format", fmt] if fmt else []) + ["--json"]
    with warnings.catch_warnings():
        # the console shows these on stderr (a second line, or noise after exit 0): here they are failures
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("error", UserWarning)
        code, out, err = invoke(monkeypatch, capsys, *args)
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 0:
        stats = json.loads(out)
        assert err == "", err
        assert 1 <= stats["interactions"]
        assert max(stats["users"], stats["items"], stats["positives"]) <= stats["interactions"]
        ds = load_dataset(target, fmt=fmt, like_threshold=None)
        for raw in [*ds.users["raw_id"], *ds.items["raw_id"]]:
            assert raw and raw == raw.strip() and not CONTROL.search(raw), repr(raw)
        event("exit 0")
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    assert str(folder) in lines[0], lines[0]  # names the file or path
    event("exit 2: " + re.sub(r"\d+", "N", lines[0].replace(str(folder), "").removeprefix("error: "))[:48])


@pytest.fixture
def scratch(tmp_path):
    """A fresh folder per generated example (tmp_path is one folder per test function)."""
    counter = itertools.count()

    def make() -> Path:
        folder = tmp_path / f"example-{next(counter)}"
        folder.mkdir()
        return folder
    return make


@SETTINGS
@given(fmt=st.sampled_from([*MAIN_FILES, None]), data=st.binary(max_size=200), compress=st.integers(0, 5),
       name=rarely(st.sampled_from([*MAIN_FILES.values(), "x.json.gz"]), st.none(), 4))
def test_random_bytes(fmt, data, compress, name, scratch, monkeypatch, capsys):
    """Random bytes as the format's main file (now and then under another name, or as .json.gz)."""
    name = name or MAIN_FILES.get(fmt, "x.json.gz")
    folder = scratch()
    if compress == 0:
        data = gzip.compress(data)
    elif compress == 1:
        data = gzip.compress(data)[: max(0, len(data) // 2)]  # truncated gzip
    (folder / name).write_bytes(data)
    check_contract(monkeypatch, capsys, folder, str(folder), fmt)


@SETTINGS
@given(inter=recbole_inter(), gz=st.integers(0, 7), detect=st.booleans())
def test_recbole_atomic_files(inter, gz, detect, scratch, monkeypatch, capsys):
    folder = scratch()
    (folder / "t.inter").write_bytes(gzip.compress(inter) if gz == 0 else inter)
    check_contract(monkeypatch, capsys, folder, str(folder / "t.inter"), None if detect else "recbole")


@SETTINGS
@given(reviews=amazon_reviews(), name=st.sampled_from(["x.json", "x.json", "x.json.gz"]), gz=st.booleans())
def test_amazon_json_lines(reviews, name, gz, scratch, monkeypatch, capsys):
    folder = scratch()
    (folder / name).write_bytes(gzip.compress(reviews) if gz else reviews)
    check_contract(monkeypatch, capsys, folder, str(folder), "amazon")


@SETTINGS
@given(case=delimited(), detect=st.booleans())
def test_line_formats(case, detect, scratch, monkeypatch, capsys):
    fmt, name, data = case
    folder = scratch()
    (folder / name).write_bytes(data)
    check_contract(monkeypatch, capsys, folder, str(folder), None if detect else fmt)


@SETTINGS
@given(case=dataset_with_side_files(), detect=st.booleans())
def test_side_files(case, detect, scratch, monkeypatch, capsys):
    fmt, files = case
    folder = scratch()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    check_contract(monkeypatch, capsys, folder, str(folder), None if detect else fmt)
