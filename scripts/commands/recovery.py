"""`fanfare recovery rebuild FLOW`: a fresh recovery directory that keeps the input positions.

A flow's recovery directory (Bytewax SQLite partitions) holds three kinds of state:

- input positions: the next offset of every partition it reads (for the fan-out: post_created,
  post_created.backfill and the changelogs; for delivery: the channel lanes and push.retry);
- work in progress: the fan-out's shard jobs with their cursors, pushes deferred by quiet
  hours and the recent-job dedupe memory; the retry records delivery holds until they are due;
- the output writers' positions, used after a restart to drop what was already written.

What is built from the changelogs is not there: preferences and devices are replayed from their
changelogs on every start, and follow changes live in the follower store. So a rebuild writes a
new directory (FANFARE_RECOVERY_PARTITIONS partitions, one snapshot per state, no history) with
every state of the last complete snapshot carried over; posts already fanned out are not read
again and nothing in progress is lost. With `--replay-follow-changes` the fan-out's
follow_changes positions are left out, so the follow changes are re-read from the beginning and
applied to the follower store again (upserts, in order: the store converges to the changelog;
posts wait at the start-up gate until it is read).

`fanfare run FLOW --fresh` is not a rebuild: it re-reads every retained post and fans it out
again (the post claim binds a post to its message, and the same message owns its claim), and
only delivery's per-device claims keep pushes at one per device.

The new directory is written beside the old one and swapped in; the old one is kept, renamed
`FLOW.replaced-<UTC time>`. Bytewax 0.21's recovery schema is read and written directly: the new
directory holds one execution whose frontier is epoch 2 and every state at epoch 1.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zlib import crc32

from flows.registry import FLOWS
from flows.runtime.flow_process import is_flow_process
from flows.runtime.recovery_marker import recovery_lineage
from operators.config import Settings
from schemas.topics import FOLLOW_CHANGES

_PREFIX = "fanfare recovery"
SEEDED_EPOCH = 1
"""Epoch of every state in a rebuilt directory; its execution's frontier is the next one."""


class RebuildError(Exception):
    """The rebuild cannot proceed (exit 1); the message says why and what to do."""


@dataclass(frozen=True)
class Recovered:
    """The last complete snapshot of a recovery directory."""

    path: Path
    partitions: int
    resume_epoch: int
    states: dict[tuple[str, str], bytes]
    """(step_id, state_key) -> pickled state, as Bytewax would load it on resume."""
    last_write: datetime | None


def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _parse_created(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def resume_epoch(
    executions: Iterable[tuple[int, int, int]], frontiers: Iterable[tuple[int, int, int]]
) -> int:
    """Bytewax's resume epoch: over the workers of the last execution, the least frontier.

    `executions` are (ex_num, worker_count, resume_epoch), `frontiers` (ex_num, worker_index,
    worker_frontier); a worker without a frontier counts at its execution's resume epoch.
    """
    exs = list(executions)
    if not exs:
        return 1  # no execution recorded: nothing was snapshotted
    ex_num, workers, resumed_at = max(exs)
    best = dict.fromkeys(range(workers), resumed_at)
    for ex, worker, frontier in frontiers:
        if ex == ex_num and worker in best:
            best[worker] = max(best[worker], frontier)
    return min(best.values())


def read_recovery(path: Path) -> Recovered:
    """The state Bytewax would resume from; RebuildError when there is none to read."""
    files = sorted(path.glob("*.sqlite3"))
    if not files:
        raise RebuildError(
            f"no recovery partitions in {path}: nothing to rebuild from (a flow that never ran "
            "starts at the topics' beginning anyway)"
        )
    parts: dict[int, int] = {}
    exs: list[tuple[int, int, int]] = []
    fronts: list[tuple[int, int, int]] = []
    commits: list[tuple[int, int]] = []
    snaps: list[tuple[str, str, int, bytes | None]] = []
    stamps: list[datetime] = []
    for f in files:
        db = _connect_ro(f)
        try:
            for index, count in db.execute("SELECT part_index, part_count FROM parts"):
                parts[int(index)] = int(count)
            exs += [
                tuple(r) for r in db.execute("SELECT ex_num, worker_count, resume_epoch FROM exs")
            ]
            fronts += [
                tuple(r)
                for r in db.execute("SELECT ex_num, worker_index, worker_frontier FROM fronts")
            ]
            commits += [
                tuple(r) for r in db.execute("SELECT part_index, commit_epoch FROM commits")
            ]
            snaps += [
                tuple(r)
                for r in db.execute("SELECT step_id, state_key, snap_epoch, ser_change FROM snaps")
            ]
            for (stamp,) in db.execute(
                "SELECT MAX(created_at) FROM (SELECT created_at FROM fronts "
                "UNION ALL SELECT created_at FROM snaps)"
            ):
                parsed = _parse_created(stamp)
                if parsed is not None:
                    stamps.append(parsed)
        except sqlite3.DatabaseError as exc:
            raise RebuildError(f"{f} is not a readable Bytewax recovery partition: {exc}") from None
        finally:
            db.close()
    counts = set(parts.values())
    if len(counts) != 1:
        raise RebuildError(f"{path}: partitions disagree on their count ({sorted(counts)})")
    (count,) = counts
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise RebuildError(
            f"{path} lacks recovery partitions {missing} of {count} (a multi-host member's "
            "share?): gather every partition in one directory first"
        )
    epoch = resume_epoch(exs, fronts)
    gced = sorted(p for p, e in commits if e > epoch)
    if gced:
        raise RebuildError(
            f"{path}: partitions {gced} were garbage-collected past epoch {epoch}; they come from "
            "a newer backup than the others"
        )
    latest: dict[tuple[str, str], tuple[int, bytes | None]] = {}
    for step, key, snap_epoch, blob in snaps:
        if snap_epoch < epoch and snap_epoch >= latest.get((step, key), (-1, None))[0]:
            latest[(step, key)] = (snap_epoch, blob)
    states = {k: blob for k, (_, blob) in latest.items() if blob is not None}
    return Recovered(path, count, epoch, states, max(stamps) if stamps else None)


def dropped_keys(
    flow: str, states: Iterable[tuple[str, str]], replay_follows: bool
) -> set[tuple[str, str]]:
    """The states left out of the new directory (rebuilt from the changelogs instead)."""
    if flow != "fanout" or not replay_follows:
        return set()
    return {
        (step, key)
        for step, key in states
        if step == "fanout.read_changelogs" and key.startswith(f"{FOLLOW_CHANGES}/")
    }


def write_recovery(
    path: Path, partitions: int, states: Mapping[tuple[str, str], bytes], lineage: str = ""
) -> None:
    """A new recovery directory holding `states`, resumed from as if just snapshotted.

    `lineage` continues the old directory's (see `recovery_marker`): its writers' start marks
    still say where writers with no snapshot began.

    One execution (ex 0, one worker) whose frontier is SEEDED_EPOCH + 1, and every state at
    SEEDED_EPOCH, so Bytewax resumes at epoch 2 with them. Each state goes to a partition by a
    stable hash; Bytewax loads every partition on resume, so any partition would do.
    """
    from flows.runtime.runner import ensure_recovery_dir

    ensure_recovery_dir(path, partitions, lineage=lineage)
    dbs = [sqlite3.connect(path / f"part-{i}.sqlite3") for i in range(partitions)]
    try:
        dbs[0].execute(
            "INSERT INTO exs (ex_num, worker_count, resume_epoch) VALUES (0, 1, ?)",
            (SEEDED_EPOCH,),
        )
        dbs[0].execute(
            "INSERT INTO fronts (ex_num, worker_index, worker_frontier) VALUES (0, 0, ?)",
            (SEEDED_EPOCH + 1,),
        )
        for (step, key), blob in sorted(states.items()):
            db = dbs[crc32(f"{step}\0{key}".encode()) % partitions]
            db.execute(
                "INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) VALUES (?,?,?,?)",
                (step, key, SEEDED_EPOCH, blob),
            )
        for db in dbs:
            db.commit()
    finally:
        for db in dbs:
            db.close()


def flow_processes(recovery: Path) -> list[int]:
    """Pids of local flow processes (`bytewax.run` under any name) using this recovery directory."""
    target = str(recovery.resolve())
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if not is_flow_process(text):
            continue
        for i, arg in enumerate(text[:-1]):
            if arg == "-r" and str(Path(text[i + 1]).resolve()) == target:
                found.append(int(entry.name))
    return found


def _describe(value: Any) -> str:
    if isinstance(value, int):  # a reader's snapshot before topic ids
        return f"next offset {value:,}"
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], int)
        and isinstance(value[1], str | None)
    ):  # a reader's snapshot: the offset and the id of the topic log it counts in
        return f"next offset {value[0]:,} (topic id {value[1] or 'not seen yet'})"
    if isinstance(value, dict) and value.get("v") == 2 and "jobs" in value:
        text = f"{len(value['jobs'])} job(s) in flight, {len(value['deferred'])} deferred push(es)"
        notify = value.get("notify")
        if isinstance(notify, dict):  # API notifications (a shard's snapshot since they exist)
            held = sum(len(users) for _, _, users in notify.get("held", ()))
            text += (
                f", {len(notify.get('queues', ()))} notification job(s) queued, "
                f"{held} recipient(s) held until send_at"
            )
        return text
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def summarize(states: Mapping[tuple[str, str], bytes], limit: int = 8) -> list[str]:
    """Lines per step: how many states and a look at the first few."""
    by_step: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for (step, key), blob in sorted(states.items()):
        by_step[step].append((key, blob))
    lines = []
    for step, items in by_step.items():
        lines.append(f"    {step}: {len(items)} state(s)")
        for key, blob in items[:limit]:
            try:
                shown = _describe(pickle.loads(blob))
            except Exception:  # a state that does not unpickle here is still carried
                shown = f"{len(blob)} bytes"
            lines.append(f"      {key}: {shown}")
        if len(items) > limit:
            lines.append(f"      ... and {len(items) - limit} more")
    return lines


def rebuild(
    settings: Settings,
    flow: str,
    *,
    replay_follows: bool,
    dry_run: bool,
    force: bool,
    out: Any,
    now: datetime | None = None,
) -> int:
    """The command's work; returns the exit code."""
    target = settings.recovery_dir(flow)
    if not target.exists():
        raise RebuildError(
            f"{target} does not exist: nothing to rebuild from. `fanfare run {flow}` creates it; "
            f"`--fresh` would read every retained input from the beginning"
        )
    running = flow_processes(target)
    if running and not force and not dry_run:
        raise RebuildError(
            f"the {flow} flow is running on {target} (pids {running}): stop it first"
        )
    old = read_recovery(target)
    drop = dropped_keys(flow, old.states, replay_follows)
    carried = {k: v for k, v in old.states.items() if k not in drop}
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    backup = target.with_name(f"{flow}.replaced-{stamp}")
    head = "dry run: " if dry_run else ""
    print(
        f"{head}rebuild {flow} recovery: {target} ({old.partitions} partitions, last complete "
        f"snapshot before epoch {old.resume_epoch}, {len(old.states)} states"
        + (f", last written {old.last_write:%Y-%m-%d %H:%M:%S}Z)" if old.last_write else ")"),
        file=out,
    )
    print(f"  carried ({len(carried)}):", file=out)
    for line in summarize(carried):
        print(line, file=out)
    if drop:
        print(
            f"  left out ({len(drop)}): follow_changes positions; follow changes are re-read "
            "from the beginning and applied to the follower store again",
            file=out,
        )
    print(
        "  rebuilt on start from the changelogs: preferences and devices (every start)"
        + (", the follower store (follow_changes)" if drop else ""),
        file=out,
    )
    if dry_run:
        print(
            f"nothing written; a rebuild writes {settings.recovery_partitions} partitions and "
            f"keeps the old directory as {backup}",
            file=out,
        )
        return 0
    if not old.states:
        print(
            "  the old directory has no complete snapshot yet: the new one starts every input "
            "at its beginning, as the old one would",
            file=out,
        )
    staging = target.with_name(f"{flow}.rebuilding")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted rebuild; never swapped in
    write_recovery(staging, settings.recovery_partitions, carried, recovery_lineage(target))
    check = read_recovery(staging)
    if check.states != carried:
        shutil.rmtree(staging)
        raise RebuildError("the new directory does not read back as written; nothing changed")
    os.replace(target, backup)
    os.replace(staging, target)
    print(
        f"rebuilt {target}: {settings.recovery_partitions} partitions, {len(carried)} states; "
        f"the old directory is {backup} (delete it once the flow runs well)",
        file=out,
    )
    return 0


def add_parser(sub: Any) -> None:
    """`fanfare recovery rebuild` on the top-level subparsers."""
    recovery = sub.add_parser("recovery", help="a flow's recovery directory")
    actions = recovery.add_subparsers(dest="recovery_command", required=True, metavar="ACTION")
    rb = actions.add_parser(
        "rebuild",
        help="write a fresh recovery directory that keeps the input positions",
        description="Write a fresh recovery directory (FANFARE_RECOVERY_PARTITIONS partitions) "
        "from the last complete snapshot: input positions, work in progress and writer "
        "positions are carried, so posts already fanned out are not read again; state built "
        "from the changelogs is rebuilt on start. The flow must be stopped.",
    )
    rb.add_argument("flow", choices=FLOWS, help="which flow's directory")
    rb.add_argument(
        "--replay-follow-changes",
        action="store_true",
        help="fan-out: re-read follow_changes from the beginning into the follower store "
        "(after losing it or restoring an older copy)",
    )
    rb.add_argument("--dry-run", action="store_true", help="show what would be carried")
    rb.add_argument(
        "--force", action="store_true", help="rebuild even if a local flow process uses it"
    )
    recovery.set_defaults(func=command)


def command(args: argparse.Namespace, settings: Settings) -> int:
    """`fanfare recovery rebuild`: exit 0 done, 1 failed, 2 usage."""
    if args.replay_follow_changes and args.flow != "fanout":
        print(
            f"{_PREFIX}: --replay-follow-changes applies to the fanout flow only", file=sys.stderr
        )
        return 2
    try:
        return rebuild(
            settings,
            args.flow,
            replay_follows=args.replay_follow_changes,
            dry_run=args.dry_run,
            force=args.force,
            out=sys.stdout,
        )
    except RebuildError as exc:
        print(f"{_PREFIX}: {exc}", file=sys.stderr)
        return 1
