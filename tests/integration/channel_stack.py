"""A stack for the channels' API tests: broker, local providers and channels, `fanfare api`.

The local servers write their settings into the stack's settings file as `fanfare dev up` does
(FANFARE_DEV_MODE, the link secret, SMTP, SMS, VAPID); `fanfare api` runs as a subprocess on
them; the test process builds channel senders from the same settings, so an email's unsubscribe
link and an SMS's status callback point at that API.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from flows.runtime.ports import free_port
from operators.adapters.catalog_files import load_catalog
from operators.adapters.channels.factory import build_channel_senders
from operators.adapters.providers.event_loop import EventLoopThread
from operators.adapters.redis.api_store import RedisKeyStore, api_redis
from operators.config import Settings, load_settings
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest
from operators.delivery.ports import PushSender
from operators.events import MessageOrigin
from operators.notify.keys import new_key
from schemas.records import ChannelMessage
from scripts.dev import devstack
from scripts.dev.local_channels.control import ChannelControl
from scripts.harness.spawn import start_fanfare, stop_fanfare
from tests.conftest import REDIS_URL, Providers, Stack, start_providers, wait_for


@dataclass
class ChannelStack:
    stack: Stack
    settings: Settings  # with the settings file the local servers wrote
    providers: Providers
    control: ChannelControl
    port: int
    keys: RedisKeyStore
    loop: EventLoopThread
    senders: dict[str, PushSender]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self, endpoints: str = "*") -> str:
        made = new_key(
            f"t-{uuid.uuid4().hex[:6]}",
            frozenset(endpoints.split(",")),
            frozenset({"*"}),
            1000,
            1000,
            time.time(),
        )
        self.keys.add(made.record)
        return made.text

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.request(method, self.base + path, headers=headers, timeout=30, **kwargs)

    def send(self, provider: str, *requests: SendRequest) -> list[ProviderAnswer]:
        sender = self.senders[provider]
        payloads = [sender.render(r) for r in requests]
        return self.loop.run(sender.send(list(requests), payloads))

    def values(self, topic: str) -> list[bytes]:
        return [v or b"" for _, _, v in self.stack.read_topic(topic)]


def channel_request(
    provider: str, token: str, user: str, message: ChannelMessage | None, device: str | None = None
) -> SendRequest:
    n = uuid.uuid4().hex[:10]
    return SendRequest(
        provider=provider,  # type: ignore[arg-type]
        lane="normal",
        post_id=f"n_{n}",
        author_id="api:k1",
        created_at="2026-12-06T10:00:00Z",
        created_ts=time.time(),
        item={
            "notification_id": f"n_{n}:{user}",
            "user_id": user,
            "device_id": device or f"{provider}-{n}",
            "token": token,
        },
        origin=MessageOrigin(f"{provider}.transactional", 0, 1),
        message=message,
    )


@pytest.fixture(scope="module")
def channel_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChannelStack]:
    home = tmp_path_factory.mktemp("channels-api") / "home"
    prefix = f"fanfare-test-{uuid.uuid4().hex[:8]}:"
    port = free_port()
    env = {
        "FANFARE_HOME": str(home),
        "FANFARE_KAFKA_BROKERS": f"127.0.0.1:{free_port()}",
        "FANFARE_REDIS_URL": REDIS_URL,
        "FANFARE_REDIS_PREFIX": prefix,
        "FANFARE_TOPIC_PARTITIONS": "1",
        "FANFARE_SHARDS": "4",
        "FANFARE_API_PORT": str(port),
        "FANFARE_SSE_HEARTBEAT_S": "2",
        "FANFARE_LOG_LEVEL": "INFO",
    }
    base = load_settings(env)
    devstack.start_broker(base)
    providers = None
    proc = None
    loop = None
    senders: dict[str, PushSender] = {}
    try:
        from operators.adapters.kafka.admin import create_topics

        create_topics(base)
        providers = start_providers(devstack.providers_dir(base), base.settings_path)
        settings = load_settings(env)  # now with the settings file the servers wrote
        assert settings.dev_mode and settings.smtp_host and settings.link_secret_file
        proc = start_fanfare(["api"], {**os.environ, **env}, home / "api.log")
        stack = ChannelStack(
            Stack(env, settings),
            settings,
            providers,
            ChannelControl(providers.info["channels"]["control_url"]),
            port,
            RedisKeyStore(api_redis(REDIS_URL), prefix),
            EventLoopThread("test-api-channels"),
            {},
        )
        loop = stack.loop
        catalog = load_catalog(settings.categories_file, settings.templates_dir)
        policy = RetryPolicy()
        senders.update(loop.run(build_channel_senders(settings, catalog, False, policy)))
        stack.senders = senders

        def healthy() -> bool:
            assert proc is not None
            if proc.poll() is not None:
                raise AssertionError((home / "api.log").read_text())
            try:
                return stack.call("GET", "/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 90, "fanfare api to answer /health", every_s=0.2)
        yield stack
    finally:
        if loop is not None:
            for sender in senders.values():
                loop.run(sender.close())
            loop.stop()
        code = stop_fanfare(proc) if proc is not None else 0
        if providers is not None:
            providers.proc.terminate()
            providers.proc.wait(timeout=10)
        devstack.stop_broker(base)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    assert code == 0, f"fanfare api exited {code}:\n{(home / 'api.log').read_text()}"


class SseClient:
    """A minimal Server-Sent Events reader over httpx (one stream)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=15))
        self._stream = self._client.stream("GET", url, headers=headers or {})
        self.response = self._stream.__enter__()
        self._lines = self.response.iter_lines()

    def next_event(self) -> dict[str, str]:
        event: dict[str, str] = {}
        for line in self._lines:
            if not line:
                if event:
                    return event
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")
        raise AssertionError("the stream ended")

    def until(self, kind: str) -> dict[str, str]:
        while True:
            event = self.next_event()
            if event.get("event") == kind:
                return event

    def close(self) -> None:
        self._stream.__exit__(None, None, None)
        self._client.close()


def wait_json(read: Any, match: Any, timeout_s: float = 30) -> Any:
    """Poll `read()` (a list of raw values) until one decodes to something `match` accepts."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for raw in read():
            doc = json.loads(raw)
            if match(doc):
                return doc
        time.sleep(0.3)
    raise AssertionError("timed out")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


__all__ = [
    "ChannelStack",
    "Path",
    "SseClient",
    "channel_request",
    "channel_stack",
    "run",
    "wait_json",
]
