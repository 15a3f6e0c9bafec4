"""The delivery senders against the local APNs and FCM servers, each test run on every transport.

APNs: libcurl (`ApnsCurlSender`, the default) and aioapns (`ApnsSender`); FCM: libcurl
(`FcmCurlSender`, the default) and firebase-admin (`FcmSender`). Every provider answer (each
reason code, Retry-After, outages, timeouts, a bad provider token, GOAWAY with answers in flight)
must come out as the same `ProviderAnswer` from every transport, so the engine classifies it the
same way (token clean-up, retry, breaker). The servers run in this process (one instance for
the module, reset before each test); nothing here needs the broker or Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from operators.adapters.providers.apns import ApnsSender
from operators.adapters.providers.apns_curl import ApnsCurlSender
from operators.adapters.providers.config import ApnsConfig, FcmConfig, apns_config, fcm_config
from operators.adapters.providers.fcm import FcmSender
from operators.adapters.providers.fcm_curl import FcmCurlSender
from operators.adapters.providers.push_texts import TemplatePushRenderer
from operators.config import load_settings
from operators.delivery.model import ProviderAnswer, RetryPolicy, SendRequest, Verdict, classify
from operators.delivery.payloads import PushSource, PushTemplate
from operators.delivery.ports import PushSender
from operators.delivery.token_bucket import BucketSpec
from schemas.records import ChannelMessage
from scripts.dev.local_providers import LocalProviders, ProviderControl, start_local_providers
from scripts.dev.local_providers.loadtest import fcm_token
from scripts.dev.local_providers.settings_file import write_provider_settings
from tests.fakes import request

TEMPLATE = PushTemplate("{author_id} posted", "read it", "fanfare://posts/{post_id}")
APNS_CLIENTS = ["curl", "aioapns"]
FCM_CLIENTS = ["curl", "firebase-admin"]
SUMMARY = ChannelMessage(
    category="new_post",
    template_id="new_posts_bundle",
    tier="social",
    data={"count": 3, "names": "a1", "others": 2, "author_ids": "a1", "window_start": "x"},
    collapse_key="bundle:new_post:u1",
)


def summary_renderer() -> TemplatePushRenderer:
    """What the delivery flow renders a summary with: the shipped catalog's templates."""
    from operators.adapters.catalog_files import load_catalog

    return TemplatePushRenderer(TEMPLATE, load_catalog().templates)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def providers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProviders]:
    p = start_local_providers(tmp_path_factory.mktemp("providers"))
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def control(providers: LocalProviders) -> ProviderControl:
    c = providers.control()
    c.reset()
    return c


@pytest.fixture(scope="module")
def configs(
    providers: LocalProviders, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ApnsConfig, FcmConfig]:
    home = tmp_path_factory.mktemp("home")
    write_provider_settings(home / "settings.env", providers.info)  # as `fanfare dev up` does
    settings = load_settings({"FANFARE_HOME": str(home)})
    apns, fcm = apns_config(settings), fcm_config(settings)
    assert apns is not None and fcm is not None
    return apns, fcm


def apns_sender(
    client: str, config: ApnsConfig, timeout_s: float = 5.0, template: PushSource = TEMPLATE
) -> PushSender:
    bucket = BucketSpec("apns:test", 6_000_000)
    if client == "aioapns":
        return ApnsSender(config, template, bucket, RetryPolicy(), timeout_s)
    return ApnsCurlSender(config, template, bucket, RetryPolicy(), timeout_s, connections=2)


def fcm_sender(
    client: str, config: FcmConfig, timeout_s: float = 5.0, template: PushSource = TEMPLATE
) -> PushSender:
    bucket = BucketSpec("fcm:test", 6_000_000)
    if client == "firebase-admin":
        return FcmSender(config, template, bucket, RetryPolicy(), timeout_s, f"t-{uuid.uuid4()}")
    return FcmCurlSender(config, template, bucket, RetryPolicy(), timeout_s, connections=2)


def apns_token(i: int) -> str:
    return f"{i:064x}"


async def send_all(
    sender: PushSender | Callable[[], PushSender], reqs: list[SendRequest]
) -> list[ProviderAnswer]:
    """Send with a sender (or one made now, inside the loop: aioapns needs it) and close it."""
    if not isinstance(sender, PushSender):
        sender = sender()
    try:
        return await sender.send(reqs, [sender.render(r) for r in reqs])
    finally:
        await sender.close()


def apns_requests(n: int, first: int = 1) -> list[SendRequest]:
    return [
        request(user=f"u{i}", device=f"d{i}", token=apns_token(i)) for i in range(first, first + n)
    ]


# -- APNs -----------------------------------------------------------------------------------

APNS_REASONS = [
    ("Unregistered", 410, Verdict.INVALID_TOKEN),
    ("ExpiredToken", 410, Verdict.INVALID_TOKEN),
    ("BadDeviceToken", 400, Verdict.INVALID_TOKEN),
    ("DeviceTokenNotForTopic", 400, Verdict.INVALID_TOKEN),
    ("TopicDisallowed", 400, Verdict.PERMANENT),
    ("BadCollapseId", 400, Verdict.PERMANENT),
    ("PayloadTooLarge", 413, Verdict.PERMANENT),
    ("TooManyRequests", 429, Verdict.TRANSIENT),
    ("InternalServerError", 500, Verdict.TRANSIENT),
    ("ServiceUnavailable", 503, Verdict.TRANSIENT),
    ("Shutdown", 503, Verdict.TRANSIENT),
]


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_success_carries_the_headers_apns_needs(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    [req] = apns_requests(1)
    before = time.time()
    answers = run(send_all(lambda: apns_sender(client, configs[0]), [req]))
    assert answers == [ProviderAnswer(200, None)]
    [record] = control.accepted("apns")
    assert (record.token, record.message_id) == (req.item["token"], req.apns_id)
    assert (record.notification_id, record.device_id, record.collapse_id) == ("p1:u1", "d1", "p1")
    assert before <= record.time <= time.time()


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_collapse_id_is_the_message_s_collapse_key(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    # A bundle summary: a newer summary replaces the older one on the device.
    [req] = apns_requests(1)
    req = dataclasses.replace(req, message=SUMMARY)
    renderer = summary_renderer()
    assert run(send_all(lambda: apns_sender(client, configs[0], template=renderer), [req])) == [
        ProviderAnswer(200, None)
    ]
    [record] = control.accepted("apns")
    assert record.collapse_id == "bundle:new_post:u1"


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_every_reason_comes_back_as_aioapns_reports_it(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    reqs = apns_requests(len(APNS_REASONS) + 1)
    control.set_token_errors(
        "apns",
        {r.item["token"]: reason for r, (reason, _, _) in zip(reqs, APNS_REASONS, strict=False)},
    )
    answers = run(send_all(lambda: apns_sender(client, configs[0]), reqs))
    expected = [ProviderAnswer(status, reason) for reason, status, _ in APNS_REASONS]
    assert answers == [*expected, ProviderAnswer(200, None)]
    assert [classify("apns", a) for a in answers] == [
        *(verdict for _, _, verdict in APNS_REASONS),
        Verdict.ACCEPTED,
    ]


@pytest.mark.parametrize("client", APNS_CLIENTS)
@pytest.mark.parametrize(
    ("status", "reason"), [(503, "ServiceUnavailable"), (500, "InternalServerError")]
)
def test_apns_outage_answers_are_transient(
    client: str,
    status: int,
    reason: str,
    configs: tuple[ApnsConfig, FcmConfig],
    control: ProviderControl,
) -> None:
    async def scenario() -> tuple[list[ProviderAnswer], list[ProviderAnswer]]:
        sender = apns_sender(client, configs[0])
        await sender.warm_up()
        control.set_outage("apns", 0.5, status=status)
        reqs = apns_requests(3)
        during = await sender.send(reqs, [sender.render(r) for r in reqs])
        await asyncio.sleep(0.6)
        return during, await send_all(sender, reqs)

    during, after = run(scenario())
    assert during == [ProviderAnswer(status, reason)] * 3
    assert after == [ProviderAnswer(200, None)] * 3


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_rate_limit_answers_429_too_many_requests(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    control.set_rate_limit("apns", 5)
    answers = run(send_all(lambda: apns_sender(client, configs[0]), apns_requests(20)))
    counts = Counter(answers)
    assert 5 <= counts[ProviderAnswer(200, None)] <= 7
    assert counts[ProviderAnswer(200, None)] + counts[ProviderAnswer(429, "TooManyRequests")] == 20


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_a_forged_key_gets_403_invalid_provider_token(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl, tmp_path: Path
) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "other.p8").write_bytes(other)
    forged = dataclasses.replace(configs[0], key_file=tmp_path / "other.p8")
    answers = run(send_all(lambda: apns_sender(client, forged), apns_requests(2)))
    assert answers == [ProviderAnswer(403, "InvalidProviderToken")] * 2
    assert {classify("apns", a) for a in answers} == {Verdict.PERMANENT}
    assert control.stats()["apns"]["accepted"] == 0


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_answers_later_than_the_timeout_are_timeouts(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    control.set_latency("apns", 1_500)
    started = time.monotonic()
    answers = run(
        send_all(lambda: apns_sender(client, configs[0], timeout_s=0.5), apns_requests(3))
    )
    assert answers == [ProviderAnswer(None, "timeout")] * 3
    assert time.monotonic() - started < 1.4
    assert {classify("apns", a) for a in answers} == {Verdict.TRANSIENT}


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_goaway_with_sends_in_flight_answers_every_one_and_loses_none(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    """The server takes 10 of 40 streams, then GOAWAY: the 10 are answered (late) before it
    closes; the 30 it did not process are sent again on a new connection (aioapns and libcurl
    both): every push accepted once."""

    async def scenario() -> list[ProviderAnswer]:
        sender = apns_sender(client, configs[0])
        await sender.warm_up()
        control.set_latency("apns", 300)
        assert await asyncio.to_thread(control.goaway, "apns", 10) >= 1  # old ones linger
        return await send_all(sender, apns_requests(40))

    answers = run(scenario())
    assert answers == [ProviderAnswer(200, None)] * 40
    records = control.accepted("apns")
    assert {r.notification_id for r in records} == {f"p1:u{i}" for i in range(1, 41)}
    per_push = Counter(r.notification_id for r in records)
    for nid, n in per_push.items():
        if n > 1:
            assert len({r.message_id for r in records if r.notification_id == nid}) == 1
    stats = control.stats()["apns"]
    assert (stats["goaways_sent"], stats["connections_total"]) == (1, 2)
    assert stats["distinct"] == 40
    if client == "curl":
        assert stats["accepted"] == 40  # libcurl resends only what the server did not process
    else:
        assert stats["accepted"] == 50  # aioapns resends the 10 answered late too (same apns-id)


@pytest.mark.parametrize("client", APNS_CLIENTS)
def test_apns_sender_connects_before_its_first_send_and_sends_nothing(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    async def scenario() -> None:
        sender = apns_sender(client, configs[0])
        await sender.warm_up()
        stats = control.stats()["apns"]
        assert (stats["connections_total"], stats["requests"]) == (1, 0)
        assert await send_all(sender, apns_requests(2)) == [ProviderAnswer(200, None)] * 2
        assert control.stats()["apns"]["connections_total"] == 1  # the same connection

    run(scenario())


# -- FCM ------------------------------------------------------------------------------------

FCM_CODES = [
    ("UNREGISTERED", 404, Verdict.INVALID_TOKEN),
    ("SENDER_ID_MISMATCH", 403, Verdict.INVALID_TOKEN),
    ("INVALID_ARGUMENT", 400, Verdict.INVALID_TOKEN),  # about the registration token
    ("QUOTA_EXCEEDED", 429, Verdict.TRANSIENT),
    ("INTERNAL", 500, Verdict.TRANSIENT),
    ("UNAVAILABLE", 503, Verdict.TRANSIENT),
    ("THIRD_PARTY_AUTH_ERROR", 401, Verdict.TRANSIENT),
]
FCM_TOKENS = [fcm_token(__import__("random").Random(i)) for i in range(len(FCM_CODES) + 1)]


def fcm_requests(tokens: list[str]) -> list[SendRequest]:
    return [
        request(user=f"u{i}", device=f"d{i}", token=t, provider="fcm") for i, t in enumerate(tokens)
    ]


@pytest.mark.parametrize("client", FCM_CLIENTS)
def test_fcm_collapse_key_is_the_message_s_collapse_key(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    [req] = fcm_requests(FCM_TOKENS[-1:])
    req = dataclasses.replace(req, message=SUMMARY)
    renderer = summary_renderer()
    answers = run(send_all(lambda: fcm_sender(client, configs[1], template=renderer), [req]))
    assert [(a.status, a.reason) for a in answers] == [(200, None)]
    [record] = control.accepted("fcm")
    assert record.collapse_id == "bundle:new_post:u1"


@pytest.mark.parametrize("client", FCM_CLIENTS)
def test_fcm_every_error_comes_back_as_firebase_admin_reports_it(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    control.set_token_errors(
        "fcm", {t: code for t, (code, _, _) in zip(FCM_TOKENS, FCM_CODES, strict=False)}
    )
    answers = run(send_all(lambda: fcm_sender(client, configs[1]), fcm_requests(FCM_TOKENS)))
    assert [(a.status, a.reason) for a in answers] == [
        *((status, code) for code, status, _ in FCM_CODES),
        (200, None),
    ]
    assert [classify("fcm", a) for a in answers] == [
        *(verdict for _, _, verdict in FCM_CODES),
        Verdict.ACCEPTED,
    ]
    assert answers[3].retry_after_s == 1.0  # QUOTA_EXCEEDED carries Retry-After
    assert "registration token" in (answers[2].detail or "")
    accepted = control.accepted("fcm")
    assert [(r.token, r.notification_id, r.collapse_id) for r in accepted] == [
        (FCM_TOKENS[-1], f"p1:u{len(FCM_CODES)}", "p1")
    ]


@pytest.mark.parametrize("client", FCM_CLIENTS)
def test_fcm_rate_limit_and_outage_carry_retry_after(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    control.set_rate_limit("fcm", 3, retry_after_s=7)
    answers = run(
        send_all(lambda: fcm_sender(client, configs[1]), fcm_requests(FCM_TOKENS[:1] * 10))
    )
    limited = [a for a in answers if a.status == 429]
    assert 3 <= 10 - len(limited) <= 5
    assert {(a.reason, a.retry_after_s) for a in limited} == {("QUOTA_EXCEEDED", 7.0)}
    control.set_rate_limit("fcm", None)

    async def outage() -> list[ProviderAnswer]:
        sender = fcm_sender(client, configs[1])
        await sender.warm_up()  # the OAuth token first: its endpoint is on the same server
        control.set_outage("fcm", 2.0)
        return await send_all(sender, fcm_requests(FCM_TOKENS[:1]))

    [down] = run(outage())
    assert (down.status, down.reason) == (503, "UNAVAILABLE")
    assert down.retry_after_s is not None and down.retry_after_s >= 1


@pytest.mark.parametrize("client", FCM_CLIENTS)
def test_fcm_answers_later_than_the_timeout_are_transient(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    control.set_latency("fcm", 1_500)
    answers = run(
        send_all(fcm_sender(client, configs[1], timeout_s=0.5), fcm_requests(FCM_TOKENS[:2]))
    )
    assert [a.status for a in answers] == [None, None]
    assert {classify("fcm", a) for a in answers} == {Verdict.TRANSIENT}


@pytest.mark.parametrize("client", FCM_CLIENTS)
def test_fcm_answers_that_came_while_the_loop_was_busy_are_read_not_timed_out(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    """FCM answered in time, but the worker's event loop was busy past the send timeout.

    The loop also runs the other provider's sends (aioapns' HTTP/2 in Python, hundreds of
    streams when APNs is slow), so an answer can wait unread in the socket. Both senders
    reported such pushes as timeouts (asyncio.wait_for, libcurl's TIMEOUT_MS); fanfare sent
    them again and FCM, which has no idempotency key, accepted each twice.
    """
    timeout_s = 0.5

    async def scenario() -> list[ProviderAnswer]:
        sender = fcm_sender(client, configs[1], timeout_s=timeout_s)
        await sender.warm_up()
        control.set_latency("fcm", 200)  # the answers come back while the loop is busy
        reqs = fcm_requests(FCM_TOKENS)
        sending = asyncio.ensure_future(sender.send(reqs, [sender.render(r) for r in reqs]))
        deadline = time.monotonic() + 5
        while (await asyncio.to_thread(control.stats))["fcm"]["accepted"] < len(reqs):
            assert time.monotonic() < deadline, "the requests never reached the server"
        time.sleep(timeout_s * 3)  # the loop busy with other work (blocking, on purpose)
        try:
            return await sending
        finally:
            await sender.close()

    answers = run(scenario())
    assert answers == [ProviderAnswer(200, None)] * len(FCM_TOKENS)
    stats = control.stats()["fcm"]
    assert stats["accepted"] == stats["distinct"] == len(FCM_TOKENS)


def test_fcm_goaway_with_sends_in_flight_answers_them_on_libcurl(
    configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    """libcurl reads the answers the server still sends after its GOAWAY (firebase-admin's
    httpx fails every open stream instead, tests/integration/test_local_providers.py)."""

    async def scenario() -> list[ProviderAnswer]:
        sender = fcm_sender("curl", configs[1])
        await sender.warm_up()
        control.set_latency("fcm", 300)
        reqs = fcm_requests(FCM_TOKENS)
        sending = asyncio.ensure_future(sender.send(reqs, [sender.render(r) for r in reqs]))
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(control.goaway, "fcm", 0) >= 1
        try:
            return await sending
        finally:
            await sender.close()

    answers = run(scenario())
    assert answers == [ProviderAnswer(200, None)] * len(FCM_TOKENS)
    stats = control.stats()["fcm"]
    assert stats["accepted"] == stats["distinct"] == len(FCM_TOKENS)


@pytest.mark.parametrize("client", FCM_CLIENTS)
def test_fcm_sender_authenticates_and_connects_before_its_first_send(
    client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    async def scenario() -> None:
        sender = fcm_sender(client, configs[1])
        await sender.warm_up()
        stats = control.stats()["fcm"]
        # One connection for the OAuth token (the local server serves /token), one for sends.
        assert (stats["connections_total"], stats["requests"], stats["tokens_issued"]) == (
            2,
            0,
            1,
        )
        assert (
            await send_all(sender, fcm_requests(FCM_TOKENS[:2])) == [ProviderAnswer(200, None)] * 2
        )
        assert control.stats()["fcm"]["connections_total"] == 2

    run(scenario())


def test_fcm_curl_renews_its_oauth_token_beside_the_sends(
    configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    """A token about to expire is renewed in a thread while sends go on with it."""

    async def scenario() -> None:
        sender = FcmCurlSender(
            configs[1], TEMPLATE, BucketSpec("fcm:t", 600), RetryPolicy(), 5.0, connections=1
        )
        await sender.warm_up()
        credential = sender._credential
        credential.expiry = datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=2)
        reqs = fcm_requests(FCM_TOKENS[:1])
        assert await sender.send(reqs, [sender.render(r) for r in reqs]) == [
            ProviderAnswer(200, None)
        ]
        assert sender._refreshing is not None
        await sender._refreshing
        assert credential.expiry > datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=10)
        await sender.close()

    before = control.stats()["fcm"]["tokens_issued"]
    run(scenario())
    assert control.stats()["fcm"]["tokens_issued"] == before + 2


# -- API notifications: rendered from their template, collapsed by their collapse_key ----------


def with_message(r: SendRequest, collapse_key: str) -> SendRequest:
    from schemas.records import ChannelMessage

    message = ChannelMessage(
        category="login_code",
        template_id="login_code",
        tier="transactional",
        data={"code": "482913", "minutes": 10},
        collapse_key=collapse_key,
    )
    return dataclasses.replace(r, message=message, lane="transactional")


@pytest.mark.parametrize(
    ("provider", "client"), [("apns", c) for c in APNS_CLIENTS] + [("fcm", c) for c in FCM_CLIENTS]
)
def test_a_notification_s_collapse_key_reaches_the_provider_on_every_transport(
    provider: str, client: str, configs: tuple[ApnsConfig, FcmConfig], control: ProviderControl
) -> None:
    from operators.adapters.catalog_files import load_catalog
    from operators.delivery.payloads import push_collapse_id

    renderer = TemplatePushRenderer(TEMPLATE, load_catalog().templates)
    long_key = "digest:" + "x" * 80  # over APNs' 64 bytes: sent as its digest
    keys = ["login:u1", long_key]
    if provider == "apns":
        reqs = [with_message(r, k) for r, k in zip(apns_requests(2), keys, strict=True)]
        make = lambda: apns_sender(client, configs[0], template=renderer)  # noqa: E731
    else:
        plain = fcm_requests(FCM_TOKENS[:2])
        reqs = [with_message(r, k) for r, k in zip(plain, keys, strict=True)]
        make = lambda: fcm_sender(client, configs[1], template=renderer)  # noqa: E731
    answers = run(send_all(make, reqs))
    assert [a.status for a in answers] == [200, 200]
    records = sorted(control.accepted(provider), key=lambda rec: rec.device_id or "")
    assert [rec.collapse_id for rec in records] == ["login:u1", push_collapse_id(reqs[1])]
    assert len(push_collapse_id(reqs[1]).encode()) <= 64
