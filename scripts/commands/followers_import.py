"""`fanfare followers import FILE`: bulk-load a follower graph (CSV or JSONL) into the store.

The file is read line by line and fed to :meth:`FollowerStore.bulk_load` in chunks, so a graph of
any size runs in constant memory and each committed chunk survives an interrupted import
(re-running is safe: edges are upserts). Bad rows are reported as ``line N: reason`` and skipped.

Ids obey the rules of ``follow_changes`` events: the `author_id`/`follower_id` (and boolean)
definitions are taken from ``schemas/follow_changes.schema.json`` and compiled with the same
validator the flow uses, so an imported edge is one a live follow event could have created.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import io
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from typing import IO, Any, TextIO, cast

import fastjsonschema
import orjson

from operators.adapters.stores.by_url import open_follower_store
from operators.config import Settings, cassandra_credentials
from operators.fanout.eligibility import edge_flags
from operators.fanout.ports import FollowerStore, StoreMismatch
from schemas.codecs import load_schema
from scripts.commands.arguments import positive_int

Edge = tuple[str, str, int]  # (author_id, follower_id, flags), what bulk_load takes

CHUNK_ROWS = 50_000
MAX_SHOWN_ERRORS = 20
FORMATS = ("csv", "jsonl")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
ID_FIELDS = ("author_id", "follower_id")
FLAG_DEFAULTS = {"notify_on_post": True, "muted": False}  # as in follow_changes
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_BOM = b"\xef\xbb\xbf"  # spreadsheet exports start CSV files with one
_GZIP_MAGIC = b"\x1f\x8b"
_TICK_ROWS = 4_096  # rows between progress clock checks (a clock read per row costs ~5%)
_PREFIX = "fanfare followers import"


class UsageError(Exception):
    """The command line cannot work (format unknown, file missing): exit code 2."""


class ImportFailed(Exception):
    """The input cannot be imported at all (no usable CSV header, unreadable data): exit 1."""


@dataclass(frozen=True)
class BadRow:
    """A skipped row: its 1-based physical line number and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ImportStats:
    """Counts of one import; `imported` stays 0 in a dry run."""

    rows: int = 0  # data rows read (header and blank lines are not rows)
    valid: int = 0
    bad: int = 0
    imported: int = 0
    elapsed_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        """Read throughput."""
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


def format_for(path: str, explicit: str | None) -> str:
    """The input format: `--format`, else the extension (a trailing `.gz` is looked through)."""
    if explicit is not None:
        return explicit
    if path == "-":
        raise UsageError("reading stdin (-) needs --format csv or --format jsonl")
    name = path.lower().removesuffix(".gz")
    fmt = EXTENSIONS.get(os.path.splitext(name)[1])
    if fmt is None:
        known = ", ".join(f"{e}[.gz]" for e in EXTENSIONS)
        raise UsageError(
            f"cannot tell the format of {path!r} from its extension (known: {known}); "
            "pass --format csv or --format jsonl"
        )
    return fmt


@functools.cache
def _edge_validator() -> Callable[[Any], Any]:
    # Only the edge fields of the follow_changes contract: op and ts belong to events, not edges.
    props = load_schema("follow_changes")["properties"]
    schema = {"type": "object", "properties": {k: props[k] for k in (*ID_FIELDS, *FLAG_DEFAULTS)}}
    return fastjsonschema.compile(schema)  # type: ignore[no-any-return]


def _edge(obj: dict[str, Any], line: int) -> Edge | BadRow:
    for key in ID_FIELDS:
        if key not in obj:
            return BadRow(line, f"missing {key}")
        if obj[key] == "":
            return BadRow(line, f"empty {key}")
    try:
        _edge_validator()(obj)
    except fastjsonschema.JsonSchemaValueException as exc:
        return BadRow(line, exc.message.removeprefix("data."))
    author_id: str = obj["author_id"]
    follower_id: str = obj["follower_id"]
    if author_id == follower_id:
        # A self-follow never notifies (eligibility suppresses it) but would count as a follower
        # and could push the author over the celebrity threshold, so it is refused.
        return BadRow(line, "author_id equals follower_id (self-follow)")
    notify = obj.get("notify_on_post", True)
    muted = obj.get("muted", False)
    return (author_id, follower_id, edge_flags(notify, muted))


def _split_csv_line(text: str) -> list[str]:
    # One record per line: ids cannot hold line breaks (the schema forbids control characters),
    # so a quote left open is a bad row instead of silently swallowing the lines after it.
    if '"' not in text:
        return text.split(",")  # the common case, ~3x faster than the csv module
    return next(csv.reader((text,), strict=True))


def parse_csv(lines: Iterable[bytes]) -> Iterator[Edge | BadRow]:
    """Edges and bad rows of a CSV file whose first non-blank line is the header."""
    columns: dict[str, int] | None = None
    width = 0
    for number, raw in enumerate(lines, 1):
        if number == 1:
            raw = raw.removeprefix(_BOM)
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            if columns is None:
                raise ImportFailed(f"line {number}: the header is not UTF-8 ({exc})") from None
            yield BadRow(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            fields = _split_csv_line(text)
        except csv.Error as exc:
            if columns is None:
                raise ImportFailed(f"line {number}: cannot parse the header ({exc})") from None
            yield BadRow(number, f"bad CSV quoting ({exc})")
            continue
        if columns is None:
            names = [f.strip().lower() for f in fields]
            missing = [c for c in ID_FIELDS if c not in names]
            if missing:
                raise ImportFailed(
                    f"line {number}: the header must name the columns author_id and follower_id "
                    f"(missing {', '.join(missing)}; found {', '.join(names)})"
                )
            # First occurrence wins; columns fanfare does not know are ignored.
            columns = {}
            for index, name in enumerate(names):
                if name in (*ID_FIELDS, *FLAG_DEFAULTS):
                    columns.setdefault(name, index)
            width = len(names)
            continue
        if len(fields) != width:
            # Usually an unquoted comma inside an id: the columns after it would be shifted.
            plural = "" if len(fields) == 1 else "s"
            yield BadRow(number, f"{len(fields)} field{plural} but the header has {width}")
            continue
        obj: dict[str, Any] = {key: fields[index] for key, index in columns.items()}
        bad = None
        for flag, default in FLAG_DEFAULTS.items():
            cell = obj.get(flag)
            if cell is None or not cell.strip():
                obj[flag] = default
                continue
            value = _BOOLS.get(cell.strip().lower())
            if value is None:
                bad = BadRow(number, f"{flag}: expected true/false/1/0/yes/no, got {cell!r}")
                break
            obj[flag] = value
        yield bad or _edge(obj, number)


def parse_jsonl(lines: Iterable[bytes]) -> Iterator[Edge | BadRow]:
    """Edges and bad rows of a JSON Lines file (one object per line)."""
    for number, raw in enumerate(lines, 1):
        if number == 1:
            raw = raw.removeprefix(_BOM)
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield BadRow(number, f"invalid JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            yield BadRow(number, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield _edge(obj, number)


PARSERS: dict[str, Callable[[Iterable[bytes]], Iterator[Edge | BadRow]]] = {
    "csv": parse_csv,
    "jsonl": parse_jsonl,
}


def import_edges(
    rows: Iterable[Edge | BadRow],
    store: FollowerStore | None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    on_bad: Callable[[BadRow], None] | None = None,
    on_tick: Callable[[ImportStats], None] | None = None,
    stats: ImportStats | None = None,
) -> ImportStats:
    """Stream rows into `store` (None: validate only), `chunk_rows` edges per bulk_load call.

    `stats` is updated as rows go by, so a caller still has the counts if reading fails half way.
    """
    stats = stats if stats is not None else ImportStats()
    started = time.monotonic()

    def good_edges() -> Iterator[Edge]:
        for item in rows:
            stats.rows += 1
            if isinstance(item, BadRow):
                stats.bad += 1
                if on_bad is not None:
                    on_bad(item)
            else:
                stats.valid += 1
                yield item
            if on_tick is not None and stats.rows % _TICK_ROWS == 0:
                stats.elapsed_s = time.monotonic() - started
                on_tick(stats)

    edges = good_edges()
    try:
        # A bounded list per call: one transaction per chunk keeps the store's journal and its
        # per-call author set small, however big the file is.
        while chunk := list(islice(edges, chunk_rows)):
            if store is not None:
                stats.imported += store.bulk_load(chunk)
    finally:
        stats.elapsed_s = time.monotonic() - started
    return stats


class Input:
    """The opened FILE (or stdin), gunzipped when it starts with the gzip magic bytes."""

    def __init__(self, path: str, stack: ExitStack) -> None:
        self.name = "stdin" if path == "-" else path
        if path == "-":
            raw: IO[bytes] = sys.stdin.buffer
            self.size: int | None = None
        else:
            try:
                raw = stack.enter_context(open(path, "rb"))  # noqa: SIM115 (closed by the stack)
                info = os.fstat(raw.fileno())
            except OSError as exc:
                raise UsageError(f"cannot open {path}: {exc.strerror or exc}") from None
            self.size = info.st_size if stat.S_ISREG(info.st_mode) else None
        # peek() (the gzip sniff) needs a BufferedReader; a stdin replaced in tests may not be one.
        buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(cast(Any, raw))
        self._raw = buffered
        self._seekable = self.size is not None and buffered.seekable()
        # Sniffed rather than taken from the name, so `zcat`-less pipes into stdin work too.
        self.lines: Iterable[bytes] = buffered
        if buffered.peek(2)[:2] == _GZIP_MAGIC:
            self.lines = stack.enter_context(gzip.GzipFile(fileobj=buffered, mode="rb"))

    def position(self) -> int | None:
        """Bytes of the file consumed so far (compressed bytes for .gz), when knowable."""
        return self._raw.tell() if self._seekable else None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A one-line progress bar on a TTY, a line every few seconds otherwise, or nothing."""

    def __init__(
        self,
        stream: TextIO,
        enabled: bool,
        size: int | None,
        position: Callable[[], int | None],
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.size = size if size else None
        self.position = position
        self.interval_s = 0.2 if self.tty else 10.0  # logs get a line per 10 s, not a flood
        self._last = time.monotonic()
        self._drawn = False

    def tick(self, stats: ImportStats) -> None:
        """Called every few thousand rows; draws when the interval has passed."""
        now = time.monotonic()
        if not self.enabled or now - self._last < self.interval_s:
            return
        self._last = now
        line = self._render(stats)
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self._drawn = True
        else:
            self.stream.write(f"{_PREFIX}: {line}\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar so another line can be printed cleanly (it is redrawn on the next tick)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _render(self, stats: ImportStats) -> str:
        rate = f"{stats.rows:,} rows, {stats.rows_per_s:,.0f} rows/s"
        pos = self.position()
        if pos is None:
            return rate
        if self.size is None:
            return f"{_human_bytes(pos)} read, {rate}"
        done = min(pos / self.size, 1.0)
        eta = stats.elapsed_s * (1 - done) / done if done > 0 else 0.0
        bar = "#" * int(done * 24)
        return (
            f"[{bar:<24}] {done:4.0%} {_human_bytes(pos)}/{_human_bytes(self.size)}, "
            f"{rate}, ~{eta:.0f} s left"
        )


class BadRowReport:
    """Prints the first bad rows to stderr and, with --errors-file, writes every one."""

    def __init__(self, stream: TextIO, progress: Progress, errors_file: TextIO | None) -> None:
        self.stream = stream
        self.progress = progress
        self.errors_file = errors_file
        self.seen = 0

    def __call__(self, bad: BadRow) -> None:
        """Report one bad row."""
        self.seen += 1
        if self.errors_file is not None:
            self.errors_file.write(f"{bad}\n")
        if self.seen <= MAX_SHOWN_ERRORS:
            self.progress.clear()
            print(bad, file=self.stream)

    def finish(self, errors_path: str | None) -> None:
        """Say how many were not shown and where to find them."""
        hidden = self.seen - MAX_SHOWN_ERRORS
        if hidden <= 0:
            return
        where = f"all are in {errors_path}" if errors_path else "--errors-file PATH keeps them all"
        print(f"... and {hidden:,} more bad rows ({where})", file=self.stream)


def summary(stats: ImportStats, dry_run: bool) -> str:
    """The closing count line."""
    if dry_run:
        done = f"{stats.valid:,} valid (dry run, nothing written)"
    else:
        done = f"{stats.imported:,} imported"
    return (
        f"{stats.rows:,} rows read, {done}, {stats.bad:,} skipped (bad), "
        f"{stats.elapsed_s:.1f} s, {stats.rows_per_s:,.0f} rows/s"
    )


def add_parser(sub: Any) -> None:
    """Register `fanfare followers import`."""
    followers = sub.add_parser("followers", help="manage the follower store")
    followers_sub = followers.add_subparsers(
        dest="followers_command", required=True, metavar="ACTION"
    )
    load = followers_sub.add_parser(
        "import", help="bulk-load a follower graph (CSV or JSONL, optionally .gz) into the store"
    )
    load.add_argument("file", metavar="FILE", help="the graph file, or - for stdin")
    load.add_argument(
        "--format", choices=["csv", "jsonl"], default=None, help="default: from the extension"
    )
    load.add_argument("--dry-run", action="store_true", help="validate and count; write nothing")
    load.add_argument("--quiet", action="store_true", help="no progress output")
    load.add_argument("--errors-file", metavar="PATH", help="write every bad row here")
    load.add_argument(
        "--chunk-rows", type=positive_int, default=50_000, help="edges per store transaction"
    )
    followers.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare followers import`; exit codes as in scripts/cli.py.

    0: edges were imported (or the file had no rows); 1: every row was bad, or the input or the
    store failed; 2: usage (format unknown, FILE missing or unreadable).
    """
    err = sys.stderr
    with ExitStack() as stack:
        try:
            fmt = format_for(args.file, args.format)
            source = Input(args.file, stack)
            errors_file: TextIO | None = None
            if args.errors_file:
                try:
                    errors_file = stack.enter_context(open(args.errors_file, "w", encoding="utf-8"))
                except OSError as exc:
                    raise UsageError(f"cannot write {args.errors_file}: {exc.strerror}") from None
        except UsageError as exc:
            print(f"{_PREFIX}: {exc}", file=err)
            return 2
        store: FollowerStore | None = None
        if not args.dry_run:
            try:
                store = open_follower_store(
                    settings.resolved_store_url,
                    settings.shard_count,
                    **cassandra_credentials(settings),
                )
            except (StoreMismatch, ValueError, OSError) as exc:
                print(f"{_PREFIX}: cannot open the follower store: {exc}", file=err)
                return 1
            stack.callback(store.close)
        progress = Progress(err, not args.quiet, source.size, source.position)
        report = BadRowReport(err, progress, errors_file)
        stats = ImportStats()
        target = "" if store is None else f" into {settings.resolved_store_url}"
        try:
            import_edges(
                PARSERS[fmt](source.lines),
                store,
                chunk_rows=args.chunk_rows,
                on_bad=report,
                on_tick=progress.tick,
                stats=stats,
            )
        except (ImportFailed, OSError, EOFError) as exc:
            # OSError covers gzip.BadGzipFile; EOFError is a truncated .gz. Chunks already
            # committed stay (a re-run upserts the same edges again).
            progress.clear()
            print(f"{_PREFIX}: {source.name}: {exc}", file=err)
            print(f"stopped after {summary(stats, args.dry_run)}", file=err)
            return 1
        except KeyboardInterrupt:
            progress.clear()
            print(f"{_PREFIX}: interrupted after {summary(stats, args.dry_run)}", file=err)
            raise
        progress.clear()
        report.finish(args.errors_file)
        print(f"{source.name}{target}: {summary(stats, args.dry_run)}")
        if stats.rows > 0 and stats.valid == 0:
            print(f"{_PREFIX}: every row was bad; nothing imported", file=err)
            return 1
        return 0
