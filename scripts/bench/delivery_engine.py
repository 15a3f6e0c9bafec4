"""Where the delivery engine's own Python goes, per push: CPU time by stage, in one process.

    PYTHONPATH=$PWD python -m scripts.bench.delivery_engine [--batches 40] [--slice 100]

No broker, Redis, provider or Bytewax: the stages of `fanfare run delivery` that are fanfare's
Python, on the real code where it has no I/O of its own. 500-item APNs dispatch batches are
decoded (`decode_channel_batch`), handed out in slices (`LaneProgress`, `batch_requests`),
claimed (`InMemoryEdgeClaims`, then the real SQLite notification store in a temporary
directory), rendered (`apns_body`), given the libcurl sender's URL and headers (the request
list `ApnsCurlSender.send` builds, without libcurl), judged as accepted (`_judge`), recorded in
the store, and their delivery events encoded as the sink does. What it leaves out, measured
beside it in README ("Benchmarks > Delivery"): libcurl, Redis round trips, Kafka, Bytewax.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from operators.adapters.redis.rate_limiter import LocalRateLimiter
from operators.adapters.stores.sqlite_notifications import SQLiteNotificationStore
from operators.delivery.edge_claims import InMemoryEdgeClaims
from operators.delivery.engine import DeliveryEngine, DeliverySettings, Judged
from operators.delivery.ledger import LedgerUpdate
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import PushTemplate, apns_body, push_collapse_id, time_to_live_s
from operators.delivery.pipeline import LaneProgress
from operators.delivery.ports import LoopRunner, PushSender
from operators.delivery.steps import batch_requests, decode_channel_batch
from operators.delivery.token_bucket import BucketSpec
from operators.events import RawEvent
from schemas.codecs import encode_delivery_event, encode_dispatch_batch
from schemas.records import DeliveryEvent, DispatchBatch, DispatchItem

T = TypeVar("T")
ACCEPTED = ProviderAnswer(200, None)


class _NoLoop(LoopRunner):
    """Nothing here goes through the event loop."""

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        coro.close()
        raise NotImplementedError("no event loop in this benchmark")


class _Renderer(PushSender):
    """The libcurl APNs sender's render, and the request list its `send` builds."""

    provider = "apns"

    def __init__(self) -> None:
        self.bucket = BucketSpec("apns:bench", 600_000_000)
        self._template = PushTemplate()
        self._policy = RetryPolicy()

    def render(self, request: SendRequest) -> object:
        return apns_body(self._template, request)

    def requests(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[tuple[str, list[str], object]]:
        # As ApnsCurlSender.send, up to the libcurl call.
        now = time.time()
        static = ["apns-topic: t", "apns-push-type: alert", "apns-priority: 10"]
        out = []
        for r, body in zip(requests, payloads, strict=True):
            headers = [
                "authorization: bearer x",
                *static,
                f"apns-id: {r.apns_id}",
                f"apns-expiration: {int(now) + time_to_live_s(self._policy, r, now)}",
                f"apns-collapse-id: {push_collapse_id(r)}",
            ]
            out.append(("https://apns/3/device/" + r.item["token"], headers, body))
        return out

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        raise NotImplementedError


def _batch(index: int) -> RawEvent:
    items = tuple(
        DispatchItem(
            notification_id=f"p{index}:u{i}",
            user_id=f"u{i}",
            device_id=f"d{i}",
            token=f"{i:064x}",
        )
        for i in range(500)
    )
    batch = DispatchBatch(f"p{index}", "a1", "apns", "2026-12-07T16:00:00.000Z", "bulk", items)
    return RawEvent("push.apns.bulk", 0, index, None, encode_dispatch_batch(batch), time.time())


class _Stages:
    """CPU seconds spent per stage (`with stages("name"): ...`)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._stage = ""
        self._start = 0.0

    def __call__(self, stage: str) -> _Stages:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start = time.process_time()

    def __exit__(self, *_: object) -> None:
        elapsed = time.process_time() - self._start
        self.spent[self._stage] = self.spent.get(self._stage, 0.0) + elapsed


def main() -> None:
    """Run the stages over --batches dispatch batches and print CPU per push by stage."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="500-item dispatch batches")
    parser.add_argument("--slice", type=int, default=100, help="items handed out at a time")
    args = parser.parse_args()
    stages = _Stages()
    pushes = 0
    with tempfile.TemporaryDirectory() as home:
        store = SQLiteNotificationStore(str(Path(home) / "notifications.db"))
        sender = _Renderer()
        engine = DeliveryEngine(
            claims=InMemoryEdgeClaims(),
            store=store,
            limiter=LocalRateLimiter(),
            senders={"apns": sender},
            loop=_NoLoop(),
            settings=DeliverySettings(),
        )
        for event in [_batch(i) for i in range(args.batches)]:
            progress = LaneProgress()
            with stages("decode the dispatch batch"):
                decoded = decode_channel_batch(event)
            assert isinstance(decoded, tuple)
            batch, created_ts = decoded
            progress.add(event.offset, len(batch.items), event, decoded)
            while True:
                with stages("hand out slices"):
                    taken = progress.take(args.slice)
                if not taken:
                    break
                for _message, items in taken:
                    with stages("send requests"):
                        requests = batch_requests(event, batch, created_ts, items)
                    with stages("claim (store; edge claims in memory)"):
                        engine._ledger(requests)
                    with stages("render"):
                        bodies = [sender.render(r) for r in requests]
                    with stages("URL and headers"):
                        sender.requests(requests, bodies)
                    judged: list[Judged] = []
                    updates: list[LedgerUpdate] = []
                    with stages("judge"):
                        answers = [ACCEPTED] * len(requests)
                        engine._judge("apns", requests, answers, time.time(), judged, updates)
                    with stages("record (store)"):
                        store.record(updates, time.time())
                    with stages("delivery events encoded"):
                        for j in judged:
                            for e in j.outputs:
                                if isinstance(e, DeliveryEvent):
                                    encode_delivery_event(e)
                    for r in requests:
                        progress.judged(r.origin.offset, r.origin.item or 0)
                    pushes += len(requests)
        store.close()
    print(f"{pushes:,} pushes, 500-item batches in slices of {args.slice}; CPU per push:")
    for stage, seconds in stages.spent.items():
        print(f"  {stage:40s} {seconds / pushes * 1e6:6.1f} µs")
    print(f"  {'total':40s} {sum(stages.spent.values()) / pushes * 1e6:6.1f} µs")


if __name__ == "__main__":
    main()
