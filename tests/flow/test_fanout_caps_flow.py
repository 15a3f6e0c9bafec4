"""Frequency caps through the whole fan-out graph: 40 posts in an hour, a restart in the middle.

A user follows 40 authors who each post once between 12:00 and 12:40 UTC: with
FANFARE_POST_CAP=10 the user gets exactly 10 single pushes and, when the window ends at 13:00,
one summary push for the other 30 (on each device). The clock moves to 13:00 only once the
user's shard expands the last post (of an author nobody follows). The restart runs the same inputs with Bytewax recovery and an abort after 20 posts (as
after a kill -9), with and without the shards' checkpoints.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bytewax.recovery import RecoveryConfig
from bytewax.testing import TestingSink, TestingSource, run_main
from prometheus_client import REGISTRY

from flows.fanout import build_fanout_flow
from flows.runtime.runner import ensure_recovery_dir
from operators.adapters.stores.shard_state import FileShardStateStore
from operators.config import Settings
from operators.events import CaughtUp, RawEvent
from operators.fanout.ports import FollowerRow
from operators.fanout.shard import summary_id
from operators.fanout.sharding import shard_of
from schemas.records import DispatchBatch, EncodedDispatchBatch
from tests.fakes import InMemoryFollowerStore, InMemoryPostClaims
from tests.flow.test_fanout_flow import PARTS, Events, device, follow, post

NOON = datetime(2026, 6, 1, 12, tzinfo=UTC)
ONE_PM = NOON + timedelta(hours=1)
AUTHORS = [f"author{i:02d}" for i in range(40)]
LOG = "log-1"


class ClockStore(InMemoryFollowerStore):
    """A follower store that moves the test's clock to 13:00 when u's shard expands `tick`.

    u's shard decides the jobs of one activation at the time the activation started, in the
    order the posts came, so every post before `tick` is decided at 12:00; the summary goes
    out in the shard's next activation (its wake-up at 13:00).
    """

    def __init__(self) -> None:
        super().__init__(4)
        self.ticked = False

    def follower_page(
        self, author_id: str, shard_id: int, after: str | None, limit: int
    ) -> list[FollowerRow]:
        if author_id == "nobody" and shard_id == shard_of("u", 4):
            self.ticked = True
        return super().follower_page(author_id, shard_id, after, limit)

    def now(self) -> datetime:
        return ONE_PM if self.ticked else NOON


class ReplayedSource(TestingSource[Any]):
    """A changelog read again from its beginning on every start (no checkpoint floor here)."""

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> Any:
        return super().build_part(step_id, for_part, None)


def changelog() -> list[Any]:
    e = Events()
    changes: list[Any] = [e("follow_changes", follow(a, "u")) for a in AUTHORS]
    changes += [e("follow_changes", follow(AUTHORS[0], "v"))]
    changes += [
        e("device_changes", device("u", "u-phone", "apns")),
        e("device_changes", device("u", "u-tablet", "fcm")),
        e("device_changes", device("v", "v-phone", "apns")),
    ]
    changes = [RawEvent(c.topic, 0, c.offset, None, c.value, 1.0, log=LOG) for c in changes]
    return changes + [CaughtUp(p, 1e12, e.offsets.get(p.split("/")[0], 0), LOG) for p in PARTS]


def posts(abort_after: int | None = None) -> list[Any]:
    e = Events()
    out: list[Any] = []
    for i, author in enumerate(AUTHORS):
        if i == abort_after:  # the first posts are done, then the process dies
            out += [TestingSource.PAUSE(timedelta(milliseconds=500)), TestingSource.ABORT()]
        out.append(e("post_created", post(f"p{i:02d}", author)))
    # The flow stays up after `tick` until the summary went out.
    pause = TestingSource.PAUSE(timedelta(milliseconds=500))
    return [*out, e("post_created", post("tick", "nobody")), pause]


def run(
    out: list[Any],
    store: ClockStore,
    claims: InMemoryPostClaims,
    *,
    abort_after: int | None = None,
    recovery: Path | None = None,
    checkpoints: Path | None = None,
) -> None:
    settings = Settings(shard_count=4, dispatch_batch_size=2, post_cap=10, cap_window_s=3_600)
    flow = build_fanout_flow(
        settings,
        post_source=TestingSource(posts(abort_after)),
        # In one batch (one epoch): the posts after it wait for no changelog epoch.
        changelog_source=ReplayedSource(changelog(), batch_size=100),
        changelog_parts=PARTS,
        channel_sink=TestingSink(out),
        route_batch=lambda b: b.topic,
        dead_letter_sink=TestingSink([]),
        store=lambda: store,
        claims=lambda: claims,
        clock=store.now,
        shard_states=None
        if checkpoints is None
        else FileShardStateStore(checkpoints, 4, lambda _topic: LOG),
    )
    if recovery is None:
        run_main(flow)
    else:
        run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(recovery)))


def sends(
    out: list[tuple[str, DispatchBatch | EncodedDispatchBatch]],
) -> list[tuple[str, str, str]]:
    """(notification id, user, device) of every item written, in order, repeats included."""
    got = []
    for key, batch in out:
        assert key == batch.topic
        got += [(i["notification_id"], i["user_id"], i["device_id"]) for i in batch.items]
    return got


SUMMARY = summary_id("new_post", int(NOON.timestamp()))
EXPECTED = {
    *((f"p{i:02d}:u", "u", d) for i in range(10) for d in ("u-phone", "u-tablet")),
    ("p00:v", "v", "v-phone"),
    (f"{SUMMARY}:u", "u", "u-phone"),
    (f"{SUMMARY}:u", "u", "u-tablet"),
}


def summaries(out: list[tuple[str, Any]]) -> list[DispatchBatch]:
    return [b for _, b in out if isinstance(b, DispatchBatch) and b.message is not None]


def test_forty_posts_in_an_hour_give_ten_pushes_and_one_summary() -> None:
    out: list[Any] = []
    run(out, ClockStore(), InMemoryPostClaims())
    got = sends(out)
    assert sorted(got) == sorted(EXPECTED)  # exact, and no duplicates
    summary = summaries(out)
    assert {b.provider for b in summary} == {"apns", "fcm"}
    for b in summary:
        assert b.message is not None and b.message["data"]["count"] == 30
        assert b.message.get("collapse_key") == "bundle:new_post:u" and b.topic.startswith("push.")


@pytest.mark.parametrize("checkpoints", [False, True], ids=["snapshot", "snapshot+checkpoint"])
def test_a_restart_in_the_middle_gives_the_same_pushes_and_no_second_summary(
    tmp_path: Path, checkpoints: bool, caplog: pytest.LogCaptureFixture
) -> None:
    recovery = tmp_path / "recovery"
    ensure_recovery_dir(recovery, 1)
    store, claims = ClockStore(), InMemoryPostClaims()
    ckpt = tmp_path / "ckpt" if checkpoints else None
    first: list[Any] = []
    run(first, store, claims, abort_after=20, recovery=recovery, checkpoints=ckpt)
    assert not store.ticked and len(sends(first)) == 21  # stopped at 12:00: the 10 pushes sent
    if ckpt is not None:
        assert sorted(p.name for p in ckpt.iterdir()) == [f"shard-{s:05d}.ckpt" for s in range(4)]
    second: list[Any] = []
    loaded = REGISTRY.get_sample_value("fanfare_shard_checkpoints_loaded_total") or 0.0
    run(second, store, claims, recovery=recovery, checkpoints=ckpt)
    # With checkpoints, every shard started from its own (the cap rows it holds stay rows).
    now_loaded = REGISTRY.get_sample_value("fanfare_shard_checkpoints_loaded_total") or 0.0
    assert now_loaded - loaded == (4 if checkpoints else 0)
    assert "frequency-cap counts" not in caplog.text
    got = sends(first) + sends(second)
    # At-least-once: items after the last snapshot come again, and the channel sink drops
    # them by (notification id, device); what reaches a device is exactly the set.
    assert set(got) == EXPECTED
    assert Counter(n for n, u, _ in set(got) if u == "u" and not n.startswith("bundle:")) == {
        f"p{i:02d}:u": 2 for i in range(10)
    }
    assert {b.message["data"]["count"] for b in summaries(first + second)} == {30}  # type: ignore[index]
