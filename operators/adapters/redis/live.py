"""In-app live delivery in Redis: a short stream per user, and a pub/sub channel per user.

The in-app sender publishes each rendered notification with one Lua call that appends it to the
user's stream (`{prefix}inapp:stream:{user}`, the last FANFARE_INAPP_STREAM_LENGTH entries, kept
FANFARE_INAPP_STREAM_TTL_S) and publishes `ID JSON` on the user's channel
(`{prefix}inapp:live:{user}`). A connected client (the API's Server-Sent Events) gets it from
the channel at once; one that reconnects with `Last-Event-ID` reads what it missed from the
stream. The stream entry's id is the event id, so the two never disagree. The same call marks
the notification published (`{prefix}inapp:sent:{notification_id}`, kept as long as the stream):
a send the engine repeats after a crash (its answer lost with the worker) finds the mark and is
not appended again, so in-app is delivered once even across a kill -9.

`LiveHub` is the API process's side: one pub/sub connection for every connected client of the
process, subscribed to the channels of the users that have one (reference-counted), routing
each message to those clients' queues. A client that does not read fast enough loses the
oldest events of its queue (it can reconnect with Last-Event-ID), never the process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_PUBLISH = """
local seen = redis.call('GET', KEYS[2])
if seen then return {seen, 1} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'n', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], id, 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[4], id .. ' ' .. ARGV[2])
return {id, 0}
"""
QUEUE_LIMIT = 256
"""Events held for one slow client before its oldest are dropped."""
HEARTBEAT_CHUNK = 100
"""Heartbeats offered before the hub lets the loop run the woken streams."""
_SLOTS = itertools.count()
HEARTBEAT: tuple[str, str] = ("", "")
"""What the hub puts in every listener's queue each heartbeat: one timer for the process, not a
`wait_for` timer and task per client (with 10,000 clients those were garbage enough to make the
collector pause the API loop for hundreds of milliseconds)."""


def stream_key(prefix: str, user_id: str) -> str:
    """The user's stream of recent in-app notifications."""
    return f"{prefix}inapp:stream:{user_id}"


def sent_key(prefix: str, notification_id: str) -> str:
    """The mark of a per-user notification already appended (its stream id)."""
    return f"{prefix}inapp:sent:{notification_id}"


def channel_name(prefix: str, user_id: str) -> str:
    """The user's pub/sub channel."""
    return f"{prefix}inapp:live:{user_id}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_id_key(event_id: str) -> tuple[int, int]:
    """A stream id (`ms-seq`) as a sortable pair; (-1, -1) when it is not one."""
    ms, _, seq = event_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (-1, -1)


class LivePublisher:
    """The in-app sender's side: append and publish, one round trip per batch."""

    def __init__(self, client: Any, prefix: str, stream_length: int, ttl_s: int) -> None:
        self._redis = client  # redis.asyncio.Redis on the worker's event loop
        self._prefix = prefix
        self._length = stream_length
        self._ttl = ttl_s
        self._script = client.register_script(_PUBLISH)

    async def publish(self, items: Sequence[tuple[str, str, bytes]]) -> list[tuple[str, bool]]:
        """Append and publish (user_id, notification_id, JSON) items.

        Per item, in order: its stream id, and whether it had been published before (a repeated
        send: not appended or published again).
        """
        pipe = self._redis.pipeline(transaction=False)
        for user_id, notification_id, payload in items:
            await self._script(  # queued on the pipeline (the script is loaded before it runs)
                keys=[stream_key(self._prefix, user_id), sent_key(self._prefix, notification_id)],
                args=[self._length, payload, self._ttl, channel_name(self._prefix, user_id)],
                client=pipe,
            )
        return [(_text(i), bool(int(dup))) for i, dup in await pipe.execute()]


@dataclass(eq=False)
class Listener:
    """One connected client: its user and its queue of (id, JSON) events."""

    user_id: str
    queue: asyncio.Queue[tuple[str, str]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_LIMIT)
    )
    dropped: int = 0
    slot: int = field(default_factory=lambda: next(_SLOTS))
    """Which heartbeat tick beats it (listeners are spread over the heartbeat interval)."""

    def offer(self, event: tuple[str, str]) -> None:
        """Queue an event; a full queue loses its oldest."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.dropped += 1
        self.queue.put_nowait(event)


class LiveHub:
    """An API process's subscriptions: one pub/sub connection, many listeners."""

    def __init__(self, url: str, prefix: str, max_clients: int, heartbeat_s: float = 15.0) -> None:
        self._url = url
        self._prefix = prefix
        self.max_clients = max_clients
        self._heartbeat_s = heartbeat_s
        self._beat: asyncio.Task[None] | None = None
        self._listeners: dict[str, set[Listener]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._redis: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def clients(self) -> int:
        """Listeners connected now."""
        return sum(len(s) for s in self._listeners.values())

    async def _start(self) -> None:
        import redis.asyncio as aioredis

        if self._reader is None:
            self._redis = aioredis.Redis.from_url(self._url, socket_connect_timeout=2)
            self._pubsub = self._redis.pubsub()
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read())
            self._beat = loop.create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        """Each listener gets a heartbeat every `heartbeat_s`, spread over that time.

        Beating every client at once stalls the loop for the whole burst (10,000 streams woken
        together held a published event back for over a second): listeners are beaten in one
        tick a second, by slot, and the loop gets control back every HEARTBEAT_CHUNK of them.
        """
        ticks = max(1, round(self._heartbeat_s))
        tick = 0
        while True:
            await asyncio.sleep(self._heartbeat_s / ticks)
            tick = (tick + 1) % ticks
            beaten = 0
            for listeners in list(self._listeners.values()):
                for listener in list(listeners):
                    if listener.slot % ticks != tick or not listener.queue.empty():
                        continue  # not its turn, or it has events (which keep it alive)
                    listener.offer(HEARTBEAT)
                    beaten += 1
                    if beaten % HEARTBEAT_CHUNK == 0:
                        await asyncio.sleep(0)

    async def _read(self) -> None:
        while True:
            try:
                if not self._pubsub.subscribed:
                    await asyncio.sleep(0.05)
                    continue
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: redis-py resubscribes on reconnect
                log.warning("live stream: Redis pub/sub failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if message is None:
                continue
            channel = _text(message["channel"])
            if message["type"] == "subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None:
                    confirmed.set()
                continue
            if message["type"] != "message":
                continue
            event_id, _, payload = _text(message["data"]).partition(" ")
            for listener in self._listeners.get(channel, ()):
                listener.offer((event_id, payload))

    async def listen(self, user_id: str) -> Listener:
        """A listener of the user's channel, once Redis confirmed the subscription."""
        async with self._lock:
            await self._start()
            channel = channel_name(self._prefix, user_id)
            listener = Listener(user_id)
            listeners = self._listeners.setdefault(channel, set())
            listeners.add(listener)
            if len(listeners) == 1:
                confirmed = self._confirmed[channel] = asyncio.Event()
                await self._pubsub.subscribe(channel)
            else:
                confirmed = self._confirmed[channel]
        try:
            await asyncio.wait_for(confirmed.wait(), 5.0)
        except BaseException:
            await self.leave(listener)
            raise
        return listener

    async def leave(self, listener: Listener) -> None:
        """Forget a listener; the last one of a user unsubscribes."""
        async with self._lock:
            channel = channel_name(self._prefix, listener.user_id)
            listeners = self._listeners.get(channel)
            if listeners is None:
                return
            listeners.discard(listener)
            if not listeners:
                del self._listeners[channel]
                self._confirmed.pop(channel, None)
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(channel)

    async def history(self, user_id: str, after: str, limit: int = 100) -> list[tuple[str, str]]:
        """Kept events after the id `after` (`0`: all kept), oldest first."""
        await self._start()
        entries = await self._redis.xrange(
            stream_key(self._prefix, user_id), min=f"({after}", max="+", count=limit
        )
        return [(_text(i), _text(fields[b"n"])) for i, fields in entries]

    async def close(self) -> None:
        """Stop reading and close the connection."""
        for task in (self._reader, self._beat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
