"""`fanfare followers import`: CSV/JSONL parsing, bad rows by line, chunked loads, the command."""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from operators.adapters.stores.sqlite_followers import SQLiteFollowerStore
from operators.fanout.eligibility import edge_flags
from operators.fanout.sharding import shard_of
from scripts import cli
from scripts.commands.followers_import import (
    MAX_SHOWN_ERRORS,
    BadRow,
    Edge,
    ImportFailed,
    ImportStats,
    Progress,
    UsageError,
    format_for,
    import_edges,
    parse_csv,
    parse_jsonl,
)
from tests.fakes import InMemoryFollowerStore

ON = edge_flags(notify_on_post=True, muted=False)
OFF = edge_flags(notify_on_post=False, muted=False)
MUTED = edge_flags(notify_on_post=True, muted=True)
OFF_MUTED = edge_flags(notify_on_post=False, muted=True)
SHARDS = 4


def lines(text: str) -> list[bytes]:
    return io.BytesIO(text.encode("utf-8")).readlines()


def split(items: Iterable[Edge | BadRow]) -> tuple[list[Edge], list[str]]:
    edges: list[Edge] = []
    bad: list[str] = []
    for item in items:
        if isinstance(item, BadRow):
            bad.append(str(item))
        else:
            edges.append(item)
    return edges, bad


# --- format ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("g.csv", "csv"),
        ("G.CSV", "csv"),
        ("dir.v2/g.csv.gz", "csv"),
        ("g.jsonl", "jsonl"),
        ("g.ndjson", "jsonl"),
        ("g.jsonl.gz", "jsonl"),
        ("g.ndjson.gz", "jsonl"),
    ],
)
def test_format_from_extension(path: str, fmt: str) -> None:
    assert format_for(path, None) == fmt


def test_explicit_format_wins_and_stdin_needs_one() -> None:
    assert format_for("graph.txt", "jsonl") == "jsonl"
    assert format_for("-", "csv") == "csv"
    with pytest.raises(UsageError, match="needs --format"):
        format_for("-", None)
    for path in ("graph.txt", "graph", "graph.gz"):
        with pytest.raises(UsageError, match="pass --format csv or --format jsonl"):
            format_for(path, None)


# --- CSV -------------------------------------------------------------------------------------


def test_csv_rows_flags_and_defaults() -> None:
    text = (
        "author_id,follower_id,notify_on_post,muted\n"
        "a,b,true,false\n"
        "a,c,,\n"  # empty cells take the defaults
        "a,d,No,YES\n"
        "a,e,0,1\r\n"  # CRLF line ends
        'a,"f,with comma",1,0\n'  # quoted ids keep their commas
        "a, g ,yes,no\n"  # ids are verbatim (spaces are allowed by the schema)
    )
    edges, bad = split(parse_csv(lines(text)))
    assert bad == []
    assert edges == [
        ("a", "b", ON),
        ("a", "c", ON),
        ("a", "d", OFF_MUTED),
        ("a", "e", OFF_MUTED),
        ("a", "f,with comma", ON),
        ("a", " g ", ON),
    ]


def test_csv_optional_columns_any_order_unknown_columns_and_bom() -> None:
    text = "\ufeffFollower_ID, since ,author_id,muted\nb,2020,a,true\nc,2021,a,0\n"
    edges, bad = split(parse_csv(lines(text)))
    assert bad == []
    assert edges == [("a", "b", MUTED), ("a", "c", ON)]


def test_csv_bad_rows_are_reported_by_line_and_skipped() -> None:
    text = (
        "author_id,follower_id,notify_on_post,muted\n"  # 1
        "a,b,true,false\n"  # 2 ok
        ",c,true,false\n"  # 3 empty author
        "a,,true,false\n"  # 4 empty follower
        "\n"  # 5 blank: not a row
        "a,d,maybe,false\n"  # 6 bad boolean
        "a,e,true,nah\n"  # 7 bad boolean
        "a,f\n"  # 8 missing fields
        "a,g,true,false,extra\n"  # 9 one field too many (unquoted comma)
        "x,x,true,false\n"  # 10 self-follow
        'a,"h,1,0\n'  # 11 unclosed quote: the next line is still read
        "a,\x01i,1,0\n"  # 12 control character (schema pattern)
        f"{'z' * 129},j,1,0\n"  # 13 longer than the schema's maxLength
        "a,k,1,0\n"  # 14 ok
    )
    data = lines(text)
    data.insert(12, b"a,\xff\xfe,1,0\n")  # 13 not UTF-8 (the lines below shift by one)
    edges, bad = split(parse_csv(data))
    assert edges == [("a", "b", ON), ("a", "k", ON)]
    assert bad == [
        "line 3: empty author_id",
        "line 4: empty follower_id",
        "line 6: notify_on_post: expected true/false/1/0/yes/no, got 'maybe'",
        "line 7: muted: expected true/false/1/0/yes/no, got 'nah'",
        "line 8: 2 fields but the header has 4",
        "line 9: 5 fields but the header has 4",
        "line 10: author_id equals follower_id (self-follow)",
        "line 11: bad CSV quoting (unexpected end of data)",
        "line 12: follower_id must match pattern ^[^\\u0000-\\u001f\\u007f]+$",
        "line 13: not valid UTF-8 (invalid start byte at byte 2)",
        "line 14: author_id must be shorter than or equal to 128 characters",
    ]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("author_id,notify_on_post\n", "missing follower_id"),
        ("who,whom\n", "missing author_id, follower_id"),
        ('"author_id,follower_id\n', "cannot parse the header"),
    ],
)
def test_csv_header_must_name_both_id_columns(header: str, message: str) -> None:
    with pytest.raises(ImportFailed, match=message):
        list(parse_csv(lines(header + "a,b\n")))


def test_csv_empty_and_header_only_have_no_rows() -> None:
    assert list(parse_csv([])) == []
    assert list(parse_csv(lines("author_id,follower_id\n\n"))) == []


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_rows_and_bad_rows() -> None:
    text = (
        '{"author_id": "a", "follower_id": "b"}\n'  # 1 defaults
        '{"author_id": "a", "follower_id": "c", "notify_on_post": false, "muted": true, "x": 1}\n'
        "\n"  # 3 blank
        "{not json\n"  # 4
        '["a", "b"]\n'  # 5
        '{"follower_id": "d"}\n'  # 6
        '{"author_id": "a", "follower_id": ""}\n'  # 7
        '{"author_id": 7, "follower_id": "e"}\n'  # 8
        '{"author_id": "a", "follower_id": "f", "muted": "true"}\n'  # 9 booleans must be JSON
        '{"author_id": "a", "follower_id": "g", "notify_on_post": null}\n'  # 10
        '{"author_id": "a", "follower_id": "a"}\n'  # 11
        '{"author_id": "a", "follower_id": "h", "muted": true}'  # 12, no final newline
    )
    edges, bad = split(parse_jsonl(lines(text)))
    assert edges == [("a", "b", ON), ("a", "c", OFF_MUTED), ("a", "h", MUTED)]
    assert [b.split(":")[0] for b in bad] == [f"line {n}" for n in (4, 5, 6, 7, 8, 9, 10, 11)]
    assert bad[0].startswith("line 4: invalid JSON (")
    assert bad[1:] == [
        "line 5: expected a JSON object, got list",
        "line 6: missing author_id",
        "line 7: empty follower_id",
        "line 8: author_id must be string",
        "line 9: muted must be boolean",
        "line 10: notify_on_post must be boolean",
        "line 11: author_id equals follower_id (self-follow)",
    ]


# --- import_edges ----------------------------------------------------------------------------


class CountingStore(InMemoryFollowerStore):
    def __init__(self) -> None:
        super().__init__(SHARDS)
        self.calls: list[int] = []

    def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
        edges = list(edges)
        self.calls.append(len(edges))
        return super().bulk_load(edges)


def test_import_streams_in_chunks_without_reading_ahead() -> None:
    consumed = 0
    at_first_call: list[int] = []

    def rows() -> Iterator[Edge | BadRow]:
        nonlocal consumed
        for i in range(7):
            consumed += 1
            yield ("a", f"f{i}", ON)
        consumed += 1
        yield BadRow(9, "bad")

    class Watching(CountingStore):
        def bulk_load(self, edges: Iterable[tuple[str, str, int]]) -> int:
            at_first_call.append(consumed)
            return super().bulk_load(edges)

    store = Watching()
    stats = import_edges(rows(), store, chunk_rows=3)
    assert store.calls == [3, 3, 1]
    assert at_first_call[0] == 3  # only one chunk was in memory when the store was called
    assert (stats.rows, stats.valid, stats.bad, stats.imported) == (8, 7, 1, 7)
    assert store.follower_count("a") == 7


def test_import_into_sqlite_store(tmp_path: Path) -> None:
    text = (
        "author_id,follower_id,notify_on_post,muted\n"
        + "".join(f"star,u{i:03d},true,false\n" for i in range(25))
        + "star,u001,false,true\n"  # a repeated edge: the last row's flags win
        + "star,star,true,false\n"
        + "other,u000,no,no\n"
    )
    store = SQLiteFollowerStore(tmp_path / "store.db", SHARDS)
    bad: list[BadRow] = []
    stats = import_edges(parse_csv(lines(text)), store, chunk_rows=10, on_bad=bad.append)
    assert (stats.rows, stats.valid, stats.bad, stats.imported) == (28, 27, 1, 27)
    assert bad == [BadRow(28, "author_id equals follower_id (self-follow)")]
    assert store.follower_count("star") == 25
    assert store.follower_count("other") == 1
    assert store.follow_flags("star", "u001") == OFF_MUTED
    assert store.follow_flags("star", "u024") == ON
    assert store.follow_flags("other", "u000") == OFF
    assert store.follow_flags("star", "star") is None
    paged = sorted(
        row for shard in range(SHARDS) for row in store.follower_page("star", shard, None, 100)
    )
    assert paged == [(f"u{i:03d}", OFF_MUTED if i == 1 else ON) for i in range(25)]
    shard = shard_of("u007", SHARDS)
    assert ("u007", ON) in store.follower_page("star", shard, None, 100)
    store.close()


def test_dry_run_counts_without_a_store() -> None:
    stats = import_edges(parse_jsonl(lines('{"author_id":"a","follower_id":"b"}\n{}\n')), None)
    assert (stats.rows, stats.valid, stats.bad, stats.imported) == (2, 1, 1, 0)


# --- progress --------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_tty_and_lines_otherwise() -> None:
    tty = FakeTTY()
    bar = Progress(tty, True, size=2 * 1024 * 1024, position=lambda: 1024 * 1024)
    bar.interval_s = 0
    bar.tick(ImportStats(rows=50_000, elapsed_s=2.0))
    assert tty.getvalue() == (
        "\r\x1b[K[############            ]  50% 1.0 MB/2.0 MB, 50,000 rows, 25,000 rows/s, "
        "~2 s left"
    )
    bar.clear()
    assert tty.getvalue().endswith("\r\x1b[K")

    log = io.StringIO()
    plain = Progress(log, True, size=None, position=lambda: None)
    plain.interval_s = 0
    plain.tick(ImportStats(rows=10, elapsed_s=1.0))
    assert log.getvalue() == "fanfare followers import: 10 rows, 10 rows/s\n"

    quiet = io.StringIO()
    off = Progress(quiet, False, size=100, position=lambda: 50)
    off.interval_s = 0
    off.tick(ImportStats(rows=10, elapsed_s=1.0))
    assert quiet.getvalue() == ""


# --- the command -----------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("FANFARE_STORE_URL", "FANFARE_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FANFARE_SHARDS", str(SHARDS))
    return tmp_path / "home"


def open_store(home: Path) -> SQLiteFollowerStore:
    return SQLiteFollowerStore(home / "store.db", SHARDS)


CSV = "author_id,follower_id,notify_on_post,muted\na,b,1,0\na,c,0,0\nb,a,yes,yes\nq,q,1,1\n"


def test_cli_imports_a_gzipped_csv(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "graph.csv.gz"
    path.write_bytes(gzip.compress(CSV.encode()))
    assert cli.main(["followers", "import", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "4 rows read, 3 imported, 1 skipped (bad)" in out
    assert f"into sqlite:///{home / 'store.db'}" in out
    assert err == "line 5: author_id equals follower_id (self-follow)\n"
    store = open_store(home)
    assert (store.follower_count("a"), store.follower_count("b")) == (2, 1)
    assert store.follow_flags("a", "c") == OFF
    assert store.follow_flags("b", "a") == MUTED
    store.close()


def test_cli_imports_jsonl_from_stdin(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = b'{"author_id":"a","follower_id":"b"}\n{"author_id":"a","follower_id":"c"}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(data))))
    assert cli.main(["followers", "import", "-", "--format", "jsonl", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("stdin into sqlite:///")
    assert "2 rows read, 2 imported, 0 skipped (bad)" in out
    assert err == ""
    store = open_store(home)
    assert store.follower_count("a") == 2
    store.close()


def test_cli_dry_run_writes_nothing(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "graph.csv"
    path.write_text(CSV)
    assert cli.main(["followers", "import", str(path), "--dry-run"]) == 0
    out, _ = capsys.readouterr()
    assert "4 rows read, 3 valid (dry run, nothing written), 1 skipped (bad)" in out
    assert not (home / "store.db").exists()


def test_cli_caps_printed_errors_and_keeps_all_in_the_errors_file(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "graph.ndjson"
    path.write_text('{"author_id":"a","follower_id":"ok"}\n' + "nope\n" * 30)
    errors = tmp_path / "errors.txt"
    argv = ["followers", "import", str(path), "--errors-file", str(errors)]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "31 rows read, 1 imported, 30 skipped (bad)" in out
    err_lines = err.splitlines()
    assert len(err_lines) == MAX_SHOWN_ERRORS + 1
    assert err_lines[0].startswith("line 2: invalid JSON")
    assert err_lines[-2].startswith(f"line {MAX_SHOWN_ERRORS + 1}: invalid JSON")
    assert err_lines[-1] == f"... and 10 more bad rows (all are in {errors})"
    kept = errors.read_text().splitlines()
    assert [k.split(":")[0] for k in kept] == [f"line {n}" for n in range(2, 32)]


def test_cli_exit_1_when_every_row_is_bad_and_0_for_an_empty_file(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("author_id,follower_id\na,a\n,b\n")
    assert cli.main(["followers", "import", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "2 rows read, 0 imported, 2 skipped (bad)" in out
    assert "every row was bad" in err
    for name, content in (
        ("empty.jsonl", ""),
        ("empty.csv", ""),
        ("header.csv", "author_id,follower_id\n"),
    ):
        empty = tmp_path / name
        empty.write_text(content)
        assert cli.main(["followers", "import", str(empty)]) == 0
        assert "0 rows read, 0 imported, 0 skipped (bad)" in capsys.readouterr().out


def test_cli_bad_header_exits_1(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "graph.csv"
    path.write_text("from,to\na,b\n")
    assert cli.main(["followers", "import", str(path)]) == 1
    err = capsys.readouterr().err
    assert "header must name the columns author_id and follower_id" in err
    assert "stopped after 0 rows read" in err


def test_cli_truncated_gzip_exits_1_and_keeps_committed_chunks(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = "".join(f'{{"author_id":"a","follower_id":"u{i}"}}\n' for i in range(2_000))
    packed = gzip.compress(rows.encode())
    path = tmp_path / "graph.jsonl.gz"
    path.write_bytes(packed[: len(packed) - 8])  # the trailer (CRC, size) is cut off
    assert cli.main(["followers", "import", str(path), "--chunk-rows", "300"]) == 1
    err = capsys.readouterr().err
    assert f"fanfare followers import: {path}: Compressed file ended" in err
    assert "stopped after 2,000 rows read, 1,800 imported, 0 skipped (bad)" in err
    store = open_store(home)
    assert store.follower_count("a") == 1_800  # the 200 rows of the open chunk rolled back
    store.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.csv"], "cannot open missing.csv: No such file or directory"),
        (
            ["graph.txt"],
            "cannot tell the format of 'graph.txt' from its extension "
            "(known: .csv[.gz], .jsonl[.gz], .ndjson[.gz]); pass --format csv or --format jsonl",
        ),
        (["-"], "reading stdin (-) needs --format csv or --format jsonl"),
    ],
)
def test_cli_usage_errors_exit_2(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "graph.txt").write_text(CSV)
    assert cli.main(["followers", "import", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"fanfare followers import: {message}\n"
    assert not (home / "store.db").exists()


def test_cli_argparse_rejects_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["followers", "import", "g.csv", "--format", "xml"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
