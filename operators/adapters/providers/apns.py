"""APNs through aioapns, behind the engine's `PushSender` port.

Each worker builds its own client on its own event loop (aioapns insists on a running loop).
Retries belong to fanfare (`push.retry` with backoff), and every send is bounded by a timeout
(aioapns has none of its own). The JWT signing key comes from a file and is never logged.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from typing import Any

from operators.adapters.providers.config import ApnsConfig, ProviderConfigError
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.payloads import (
    PushSource,
    apns_payload,
    push_collapse_id,
    time_to_live_s,
)
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec


def window_acking_protocol(base: type[Any]) -> type[Any]:
    """Aioapns' protocol, handing back HTTP/2 receive window for the bodies it reads.

    aioapns never acknowledges received DATA, so a connection's 64 KiB receive window is used
    up by error bodies (~30-60 bytes each): after about 1,500 errors on one connection every
    further error answer waits forever (a burst of 410s would stall delivery). Found against
    the local APNs server; real APNs enforces the same flow control.
    """

    class WindowAckingProtocol(base):  # type: ignore[misc]
        def on_data_received(self, data: bytes, stream_id: int) -> None:
            self.conn.acknowledge_received_data(len(data), stream_id)
            super().on_data_received(data, stream_id)

    return WindowAckingProtocol


class ApnsSender(PushSender):
    """aioapns with token auth, pointed at `config.host:port`."""

    provider = "apns"

    def __init__(
        self,
        config: ApnsConfig,
        template: PushSource,
        bucket: BucketSpec,
        policy: RetryPolicy,
        timeout_s: float,
    ) -> None:
        # Must run on the event loop: aioapns binds its pool to the running loop.
        from aioapns import APNs
        from aioapns.connection import APNsProductionClientProtocol

        self.bucket = bucket
        self._template = template
        self._policy = policy
        self._timeout = timeout_s
        self._topic = config.topic
        try:
            key = config.key_file.read_text()
        except OSError as exc:
            raise ProviderConfigError(
                f"cannot read the APNs key {config.key_file}: {exc}"
            ) from None
        context = ssl.create_default_context()
        if config.ca_file is not None:
            context.load_verify_locations(cafile=str(config.ca_file))

        async def quiet(_request: object, _result: object) -> None:
            return None  # outcomes are recorded as events; the default logs every error

        self._client = APNs(
            key=key,
            key_id=config.key_id,
            team_id=config.team_id,
            topic=config.topic,
            use_sandbox=False,
            ssl_context=context,
            err_func=quiet,
        )
        # aioapns has no host setting: its protocol class carries it (docs/providers.md).
        self._client.pool.protocol_class = type(
            "FanfareApnsProtocol",
            (window_acking_protocol(APNsProductionClientProtocol),),
            {"APNS_SERVER": config.host, "APNS_PORT": config.port},
        )

    async def warm_up(self) -> None:
        """Open a connection before the first send (aioapns connects on first use)."""
        await asyncio.wait_for(self._client.pool.acquire(), self._timeout)

    def render(self, request: SendRequest) -> object:
        """The JSON payload (aioapns encodes it; size checked on our encoding)."""
        return apns_payload(self._template, request)

    async def _send_one(self, request: SendRequest, payload: object, now: float) -> ProviderAnswer:
        from aioapns import NotificationRequest, PushType

        notification = NotificationRequest(
            device_token=request.item["token"],
            message=payload,  # type: ignore[arg-type]
            notification_id=request.apns_id,
            time_to_live=time_to_live_s(self._policy, request, now),
            priority=10,
            collapse_key=push_collapse_id(request),
            push_type=PushType.ALERT,
        )
        try:
            result = await asyncio.wait_for(
                self._client.send_notification(notification), self._timeout
            )
        except TimeoutError:
            return ProviderAnswer(None, "timeout")
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            return ProviderAnswer(None, f"connection: {type(exc).__name__}")
        except Exception as exc:  # aioapns raises its own (e.g. MaxAttemptsExceeded)
            return ProviderAnswer(None, f"client: {type(exc).__name__}")
        status = int(result.status) if str(result.status).isdigit() else None
        reason = None if result.is_successful else (result.description or None)
        return ProviderAnswer(status, reason)

    async def send(
        self, requests: Sequence[SendRequest], payloads: Sequence[object]
    ) -> list[ProviderAnswer]:
        """One HTTP/2 stream per send, all at once (the pool multiplexes them)."""
        now = time.time()
        return list(
            await asyncio.gather(
                *(self._send_one(r, p, now) for r, p in zip(requests, payloads, strict=True))
            )
        )
