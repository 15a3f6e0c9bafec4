"""In-app live delivery, behind the engine's `PushSender` port: publish to the user's stream.

"Sent" means the rendered notification is in the user's Redis stream and was published on the
user's channel (operators/adapters/redis/live.py); `fanfare api` streams it to connected
clients (`GET /v1/users/{id}/notifications/stream`, Server-Sent Events). The inbox itself is
the notification store's (the engine records every notification it claims), so a client that
was not connected finds it there. A dispatch item's address is the user id (device_id
`inapp`): nothing to register, nothing to clean up. Redis errors are retried. A send repeated
after a crash is recognised in Redis and not appended twice (live.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson

from operators import metrics
from operators.adapters.channels.content import ChannelRenderer
from operators.adapters.redis.live import LivePublisher
from operators.delivery.model import ProviderAnswer, SendRequest
from operators.delivery.payloads import PayloadTooLarge
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec
from schemas.codecs import format_timestamp

MAX_EVENT_BYTES = 16 * 1024
INAPP_DEVICE = "inapp"
"""The device_id of a user's in-app address (its token is the user id)."""


class RedisInAppSender(PushSender):
    """Publishes rendered notifications to users' live streams in Redis."""

    provider = "inapp"

    def __init__(
        self, publisher: LivePublisher, renderer: ChannelRenderer, bucket: BucketSpec
    ) -> None:
        self.bucket = bucket
        self._publisher = publisher
        self._renderer = renderer

    def render(self, request: SendRequest) -> object:
        """The event's JSON: id, category, title, body, link, when it was created and sent."""
        content = self._renderer.content(request, limit=MAX_EVENT_BYTES)
        event = orjson.dumps(
            {
                "notification_id": content.notification_id,
                "user_id": content.user_id,
                "category": content.category,
                "title": content.title,
                "body": content.body,
                "link": content.link,
                "tag": content.tag,
                "created_at": request.created_at,
                "sent_at": format_timestamp(time.time(), "milliseconds"),
            }
        )
        if len(event) > MAX_EVENT_BYTES:
            raise PayloadTooLarge(f"in-app event is {len(event)} bytes (limit {MAX_EVENT_BYTES})")
        return event

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """One pipelined round trip for the whole call."""
        items = [
            (r.item["user_id"], r.item["notification_id"], p)
            for r, p in zip(requests, payloads, strict=True)
            if isinstance(p, bytes)
        ]
        try:
            published = await self._publisher.publish(items)
        except Exception as exc:  # redis.RedisError and connection errors: retried
            return [ProviderAnswer(None, f"redis: {type(exc).__name__}")] * len(requests)
        repeated = sum(dup for _, dup in published)
        metrics.INAPP_PUBLISHED.inc(len(items) - repeated)
        metrics.INAPP_REPEATS.inc(repeated)
        return [ProviderAnswer(200, None)] * len(requests)
