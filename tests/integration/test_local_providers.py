"""The local APNs and FCM servers, driven by the real client libraries (aioapns, firebase-admin).

The servers run in this process on a background thread (one instance for the module, reset before
each test); httpx (HTTP/2) sends the requests aioapns cannot make (no apns-id, bad headers).
Nothing here needs the broker or Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aioapns import NotificationRequest
from aioapns.common import NotificationResult
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from firebase_admin import exceptions as fb_exceptions
from firebase_admin import messaging

from scripts.dev.local_providers import (
    ControlError,
    LocalProviders,
    ProviderControl,
    spawn_local_providers,
    start_local_providers,
)
from scripts.dev.local_providers.clients import apns_client, firebase_app
from scripts.dev.local_providers.loadtest import fcm_token

TOKEN = "ab" * 32
FCM_TOKENS = [fcm_token(__import__("random").Random(i)) for i in range(8)]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def quiet(_request: object, _result: object) -> None:
    return None  # aioapns logs every error result otherwise


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


async def send(client: Any, token: str = TOKEN, **kwargs: Any) -> NotificationResult:
    message = kwargs.pop("message", {"aps": {"alert": "hi"}})
    request = NotificationRequest(device_token=token, message=message, **kwargs)
    return await asyncio.wait_for(client.send_notification(request), 5)


def provider_jwt(
    providers: LocalProviders, *, iat: float | None = None, kid: str | None = None
) -> str:
    a = providers.info["apns"]
    return jwt.encode(
        {"iss": a["team_id"], "iat": int(time.time() if iat is None else iat)},
        Path(a["key_file"]).read_text(),
        algorithm="ES256",
        headers={"kid": kid or a["key_id"]},
    )


def raw_client(providers: LocalProviders) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=providers.info["apns"]["ca_file"])
    return httpx.AsyncClient(http2=True, verify=context, base_url=providers.info["apns"]["url"])


def raw_headers(
    providers: LocalProviders, bearer: str | None = None, **extra: str
) -> dict[str, str]:
    headers = {
        "apns-topic": providers.info["apns"]["topic"],
        "authorization": f"bearer {bearer or provider_jwt(providers)}",
    }
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


# APNs through aioapns


def test_apns_success_is_recorded_with_the_apns_id_echoed(
    providers: LocalProviders, control: ProviderControl
) -> None:
    apns_id = str(uuid.uuid4())
    payload = {
        "aps": {"alert": {"title": "t", "body": "b"}},
        "notification_id": "post-1:user-1",
        "device_id": "dev-1",
    }

    async def main() -> NotificationResult:
        client = apns_client(providers.info)
        return await send(
            client,
            message=payload,
            notification_id=apns_id,
            collapse_key="post-1",
            priority=10,
            time_to_live=60,
        )

    before = time.time()
    result = run(main())
    assert (result.status, result.notification_id, result.description) == ("200", apns_id, None)
    [record] = control.accepted("apns")
    assert record.token == TOKEN
    assert record.message_id == apns_id
    assert (record.notification_id, record.device_id, record.collapse_id) == (
        "post-1:user-1",
        "dev-1",
        "post-1",
    )
    assert record.size == len(json.dumps(payload, ensure_ascii=False).encode())
    assert before <= record.time <= time.time()
    stats = control.stats()["apns"]
    assert (stats["accepted"], stats["distinct"], stats["duplicates"], stats["rejected_total"]) == (
        1,
        1,
        0,
        0,
    )


def test_apns_per_token_errors(providers: LocalProviders, control: ProviderControl) -> None:
    errors = {
        "01" * 32: "Unregistered",
        "02" * 32: "BadDeviceToken",
        "03" * 32: "DeviceTokenNotForTopic",
        "04" * 32: "ExpiredToken",
    }
    control.set_token_errors("apns", errors)

    async def main() -> list[NotificationResult]:
        client = apns_client(providers.info, err_func=quiet)
        return [await send(client, token) for token in [*errors, TOKEN]]

    results = run(main())
    assert [(r.status, r.description) for r in results] == [
        ("410", "Unregistered"),
        ("400", "BadDeviceToken"),
        ("400", "DeviceTokenNotForTopic"),
        ("410", "ExpiredToken"),
        ("200", None),
    ]
    assert (
        isinstance(results[0].timestamp, int)
        and abs(results[0].timestamp / 1000 - time.time()) < 60
    )
    stats = control.stats()["apns"]
    assert stats["rejected"] == {
        "Unregistered": 1,
        "BadDeviceToken": 1,
        "DeviceTokenNotForTopic": 1,
        "ExpiredToken": 1,
    }
    assert stats["accepted"] == 1
    with pytest.raises(ControlError, match="unknown apns reasons"):
        control.set_token_errors("apns", {TOKEN: "NoSuchReason"})


def test_apns_payload_limit_is_4096_bytes(
    providers: LocalProviders, control: ProviderControl
) -> None:
    def payload(size: int) -> dict[str, Any]:
        base = len(json.dumps({"aps": {"alert": ""}}).encode())
        return {"aps": {"alert": "x" * (size - base)}}

    async def main() -> list[NotificationResult]:
        client = apns_client(providers.info, err_func=quiet)
        return [
            await send(client, message=payload(4096)),
            await send(client, message=payload(4097)),
        ]

    ok, too_big = run(main())
    assert ok.status == "200"
    assert (too_big.status, too_big.description) == ("413", "PayloadTooLarge")


def test_apns_bad_provider_tokens_get_403(
    providers: LocalProviders, control: ProviderControl, tmp_path: Path
) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    forged = dict(providers.info)
    forged["apns"] = {**providers.info["apns"], "key_file": str(tmp_path / "other.p8")}
    (tmp_path / "other.p8").write_bytes(other_key)

    async def main() -> list[tuple[int, str]]:
        client = apns_client(forged, err_func=quiet)  # type: ignore[arg-type]
        result = await send(client)
        answers = [(int(result.status), result.description or "")]
        async with raw_client(providers) as http:
            for bearer in (
                provider_jwt(providers, iat=time.time() - 3700),
                provider_jwt(providers, kid="WRONGKEYID"),
                "not-a-jwt",
            ):
                r = await http.post(
                    f"/3/device/{TOKEN}",
                    headers=raw_headers(providers, bearer),
                    content=b'{"aps":{}}',
                )
                answers.append((r.status_code, r.json()["reason"]))
            headers = raw_headers(providers)
            del headers["authorization"]
            r = await http.post(f"/3/device/{TOKEN}", headers=headers, content=b'{"aps":{}}')
            answers.append((r.status_code, r.json()["reason"]))
        return answers

    assert run(main()) == [
        (403, "InvalidProviderToken"),
        (403, "ExpiredProviderToken"),
        (403, "InvalidProviderToken"),
        (403, "InvalidProviderToken"),
        (403, "MissingProviderToken"),
    ]
    assert control.stats()["apns"]["accepted"] == 0


def test_apns_a_connection_may_not_switch_provider_tokens_within_20_minutes(
    providers: LocalProviders, control: ProviderControl
) -> None:
    async def main() -> list[tuple[int, str]]:
        async with raw_client(providers) as http:
            out = []
            for iat in (time.time() - 10, time.time() - 5):
                r = await http.post(
                    f"/3/device/{TOKEN}",
                    headers=raw_headers(providers, provider_jwt(providers, iat=iat)),
                    content=b'{"aps":{}}',
                )
                out.append((r.status_code, r.json()["reason"] if r.content else ""))
            return out

    assert run(main()) == [(200, ""), (429, "TooManyProviderTokenUpdates")]


@pytest.mark.parametrize(
    ("method", "path", "extra", "body", "status", "reason"),
    [
        ("GET", f"/3/device/{TOKEN}", {}, b"", 405, "MethodNotAllowed"),
        ("POST", "/4/device/x", {}, b'{"aps":{}}', 404, "BadPath"),
        ("POST", "/3/device/", {}, b'{"aps":{}}', 400, "MissingDeviceToken"),
        ("POST", "/3/device/not-hex", {}, b'{"aps":{}}', 400, "BadDeviceToken"),
        ("POST", f"/3/device/{TOKEN}", {"apns_topic": ""}, b'{"aps":{}}', 400, "MissingTopic"),
        (
            "POST",
            f"/3/device/{TOKEN}",
            {"apns_topic": "com.other.app"},
            b'{"aps":{}}',
            400,
            "DeviceTokenNotForTopic",
        ),
        (
            "POST",
            f"/3/device/{TOKEN}",
            {"apns_topic": "bad topic!"},
            b'{"aps":{}}',
            400,
            "BadTopic",
        ),
        ("POST", f"/3/device/{TOKEN}", {"apns_priority": "7"}, b'{"aps":{}}', 400, "BadPriority"),
        (
            "POST",
            f"/3/device/{TOKEN}",
            {"apns_collapse_id": "c" * 65},
            b'{"aps":{}}',
            400,
            "BadCollapseId",
        ),
        (
            "POST",
            f"/3/device/{TOKEN}",
            {"apns_expiration": "soon"},
            b'{"aps":{}}',
            400,
            "BadExpirationDate",
        ),
        (
            "POST",
            f"/3/device/{TOKEN}",
            {"apns_id": "not-a-uuid"},
            b'{"aps":{}}',
            400,
            "BadMessageId",
        ),
        (
            "POST",
            f"/3/device/{TOKEN}",
            {"apns_push_type": "telepathy"},
            b'{"aps":{}}',
            400,
            "InvalidPushType",
        ),
        ("POST", f"/3/device/{TOKEN}", {}, b"", 400, "PayloadEmpty"),
        ("POST", f"/3/device/{TOKEN}", {}, b'{"alert":"no aps"}', 400, "BadPayload"),
        ("POST", f"/3/device/{TOKEN}", {}, b"not json", 400, "BadPayload"),
    ],
)
def test_apns_request_validation(
    providers: LocalProviders,
    control: ProviderControl,
    method: str,
    path: str,
    extra: dict[str, str],
    body: bytes,
    status: int,
    reason: str,
) -> None:
    async def main() -> httpx.Response:
        async with raw_client(providers) as http:
            headers = raw_headers(providers, **extra)
            if headers["apns-topic"] == "":
                del headers["apns-topic"]
            return await http.request(method, path, headers=headers, content=body)

    r = run(main())
    assert (r.status_code, r.json()) == (status, {"reason": reason})
    assert r.headers["apns-id"] == extra.get("apns_id") or uuid.UUID(r.headers["apns-id"])
    assert control.stats()["apns"]["rejected"] == {reason: 1}


def test_apns_makes_up_an_apns_id_when_the_request_has_none(
    providers: LocalProviders, control: ProviderControl
) -> None:
    async def main() -> httpx.Response:
        async with raw_client(providers) as http:
            return await http.post(
                f"/3/device/{TOKEN}", headers=raw_headers(providers), content=b'{"aps":{}}'
            )

    r = run(main())
    assert (r.status_code, r.content) == (200, b"")
    assert control.accepted("apns")[0].message_id == r.headers["apns-id"]


def test_apns_rate_limit_answers_429(providers: LocalProviders, control: ProviderControl) -> None:
    control.set_rate_limit("apns", 5)

    async def main() -> list[NotificationResult]:
        client = apns_client(providers.info, err_func=quiet)
        return list(await asyncio.gather(*(send(client) for _ in range(20))))

    statuses = Counter((r.status, r.description) for r in run(main()))
    assert 5 <= statuses[("200", None)] <= 7  # a 5/s bucket, plus what refills meanwhile
    assert statuses[("200", None)] + statuses[("429", "TooManyRequests")] == 20
    control.set_rate_limit("apns", None)
    assert run(main())[0].status == "200"


@pytest.mark.parametrize(
    ("status", "reason"), [(503, "ServiceUnavailable"), (500, "InternalServerError")]
)
def test_apns_outage_then_recovery(
    providers: LocalProviders, control: ProviderControl, status: int, reason: str
) -> None:
    control.set_outage("apns", 0.4, status=status)

    async def main() -> tuple[NotificationResult, NotificationResult]:
        client = apns_client(providers.info, err_func=quiet)
        during = await send(client)
        await asyncio.sleep(0.5)
        return during, await send(client)

    during, after = run(main())
    assert (during.status, during.description) == (str(status), reason)
    assert after.status == "200"


def test_apns_goaway_makes_aioapns_resend_on_a_new_connection(
    providers: LocalProviders, control: ProviderControl
) -> None:
    async def main() -> list[NotificationResult]:
        client = apns_client(providers.info)
        await send(client)  # connection up
        assert await asyncio.to_thread(control.goaway, "apns", 5) >= 1  # earlier tests' may linger
        return list(
            await asyncio.gather(
                *(send(client, message={"aps": {}, "notification_id": f"n{i}"}) for i in range(20))
            )
        )

    assert {r.status for r in run(main())} == {"200"}
    stats = control.stats()["apns"]
    assert (stats["goaways_sent"], stats["connections_total"]) == (1, 2)
    # The 5 answered before GOAWAY were not sent again, the 15 cut off were, once each.
    counts = Counter(r.notification_id for r in control.accepted("apns") if r.notification_id)
    assert counts == {f"n{i}": 1 for i in range(20)}


def test_apns_goaway_with_answers_in_flight_duplicates_them(
    providers: LocalProviders, control: ProviderControl
) -> None:
    control.set_latency("apns", 400)

    async def main() -> list[NotificationResult]:
        client = apns_client(providers.info)
        sends = asyncio.gather(
            *(send(client, message={"aps": {}, "notification_id": f"n{i}"}) for i in range(5))
        )
        await asyncio.sleep(0.15)  # received and recorded, answers held back
        assert await asyncio.to_thread(control.goaway, "apns", 0) >= 1
        return list(await sends)

    assert {r.status for r in run(main())} == {"200"}
    stats = control.stats()["apns"]
    # aioapns closes on GOAWAY and sends everything unanswered again: the provider got each twice.
    assert (stats["accepted"], stats["distinct"], stats["duplicates"]) == (10, 5, 5)


def test_apns_latency_holds_answers_back_without_serializing_them(
    providers: LocalProviders, control: ProviderControl
) -> None:
    control.set_latency("apns", 300)

    async def main() -> tuple[float, list[NotificationResult]]:
        client = apns_client(providers.info)
        await send(client, message={"aps": {}})  # connection up (and 300 ms)
        started = time.perf_counter()
        results = await asyncio.gather(*(send(client) for _ in range(50)))
        return time.perf_counter() - started, list(results)

    elapsed, results = run(main())
    assert {r.status for r in results} == {"200"}
    assert 0.3 <= elapsed < 2.0  # 50 answers one after another would take 15 s


def test_apns_error_bodies_wait_for_window_that_aioapns_never_gives_back(
    providers: LocalProviders, control: ProviderControl
) -> None:
    bad = "ee" * 32
    control.set_token_errors("apns", {bad: "BadDeviceToken"})
    body_size = len(b'{"reason":"BadDeviceToken"}')

    async def main(ack_window: bool, timeout: float) -> Counter[str]:
        client = apns_client(
            providers.info, ack_window=ack_window, max_connections=1, err_func=quiet
        )
        outcomes: Counter[str] = Counter()

        async def one() -> None:
            try:
                result = await asyncio.wait_for(
                    client.send_notification(NotificationRequest(bad, {"aps": {}})), timeout
                )
                outcomes[result.status] += 1
            except TimeoutError:
                outcomes["timeout"] += 1

        await asyncio.gather(*(one() for _ in range(2600)))
        return outcomes

    # aioapns' own protocol: a 64 KiB window of error bodies, then every error answer waits.
    # Those past the window never get an answer: 5 s is long enough to tell.
    blocked = run(main(False, 5))
    assert blocked == {"400": 65535 // body_size, "timeout": 2600 - 65535 // body_size}
    # Acknowledging received data (clients.WindowAckingProtocol) keeps them flowing. All 2600
    # answers come; a loaded CI machine took over 5 s for the last of them, hence the long wait.
    assert run(main(True, 60)) == {"400": 2600}


def test_loose_tokens_accept_any_token_shape(tmp_path: Path) -> None:
    with start_local_providers(tmp_path, strict_tokens=False) as loose:

        async def main() -> NotificationResult:
            return await send(apns_client(loose.info), "fanfare-device-1")

        assert run(main()).status == "200"


# FCM through firebase-admin


class FcmSession:
    """A firebase App and the one event loop its httpx client is bound to.

    firebase-admin's async client belongs to the loop it first ran on, and delete_app closes it
    with asyncio.run(): so close it on its own loop first, then delete the app outside any loop.
    """

    def __init__(self, info: Any, **kwargs: Any) -> None:
        self.runner = asyncio.Runner()
        self.app = firebase_app(info, f"test-{uuid.uuid4().hex}", **kwargs)

    def send(
        self, messages: list[messaging.Message], dry_run: bool = False
    ) -> list[messaging.SendResponse]:
        async def main() -> list[messaging.SendResponse]:
            batch = await asyncio.wait_for(
                messaging.send_each_async(messages, dry_run=dry_run, app=self.app), 10
            )
            return list(batch.responses)

        return self.runner.run(main())

    def close(self) -> None:
        import firebase_admin

        self.runner.run(messaging._get_messaging_service(self.app)._async_client.aclose())
        self.runner.close()
        firebase_admin.delete_app(self.app)


@pytest.fixture
def fcm(providers: LocalProviders, control: ProviderControl) -> Iterator[FcmSession]:
    session = FcmSession(providers.info)
    try:
        yield session
    finally:
        session.close()


@pytest.mark.filterwarnings("ignore:Message.token is deprecated:DeprecationWarning")
def test_fcm_success_through_the_service_account_token_flow(
    fcm: FcmSession, control: ProviderControl
) -> None:
    messages = [
        messaging.Message(
            fid=FCM_TOKENS[0],
            data={"notification_id": "post-1:user-1", "device_id": "dev-1"},
            android=messaging.AndroidConfig(collapse_key="post-1"),
        ),
        messaging.Message(
            token=FCM_TOKENS[1], notification=messaging.Notification(title="t", body="b")
        ),
        messaging.Message(fid="cR1zXh3pQwe5TyuIo9Plkj"),  # an installation id's shape
    ]
    first, second, third = fcm.send(messages)
    assert first.success and second.success and third.success
    records = {r.token: r for r in control.accepted("fcm")}
    assert records[FCM_TOKENS[0]].message_id == first.message_id
    assert first.message_id.startswith("projects/fanfare-local/messages/")
    assert (
        records[FCM_TOKENS[0]].notification_id,
        records[FCM_TOKENS[0]].device_id,
        records[FCM_TOKENS[0]].collapse_id,
    ) == ("post-1:user-1", "dev-1", "post-1")
    assert records[FCM_TOKENS[1]].notification_id is None
    stats = control.stats()["fcm"]
    assert (stats["accepted"], stats["tokens_issued"]) == (3, 1)


def test_fcm_errors_map_to_the_firebase_admin_exception_classes(
    fcm: FcmSession, control: ProviderControl
) -> None:
    codes = [
        "UNREGISTERED",
        "SENDER_ID_MISMATCH",
        "INVALID_ARGUMENT",
        "QUOTA_EXCEEDED",
        "INTERNAL",
        "UNAVAILABLE",
        "THIRD_PARTY_AUTH_ERROR",
    ]
    control.set_token_errors("fcm", dict(zip(FCM_TOKENS, codes, strict=False)))
    responses = fcm.send([messaging.Message(fid=t) for t in FCM_TOKENS[: len(codes)]])
    kinds = [type(r.exception) for r in responses]
    assert kinds == [
        messaging.UnregisteredError,
        messaging.SenderIdMismatchError,
        fb_exceptions.InvalidArgumentError,
        messaging.QuotaExceededError,
        fb_exceptions.InternalError,
        fb_exceptions.UnavailableError,
        messaging.ThirdPartyAuthError,
    ]
    assert [r.exception.http_response.status_code for r in responses] == [
        404,
        403,
        400,
        429,
        500,
        503,
        401,
    ]
    assert responses[3].exception.http_response.headers["retry-after"] == "1"
    assert "registration token" in str(responses[2].exception)
    rejected = control.stats()["fcm"]["rejected"]
    assert rejected["UNREGISTERED"] == 1
    # firebase-admin answers a 401 by refreshing its credentials and trying again, twice.
    assert rejected["THIRD_PARTY_AUTH_ERROR"] == 3


def test_fcm_rejects_malformed_messages(fcm: FcmSession, control: ProviderControl) -> None:
    big = messaging.Message(fid=FCM_TOKENS[0], data={"blob": "x" * 4100})
    responses = fcm.send([messaging.Message(fid="not-a-token"), big])
    assert [type(r.exception) for r in responses] == [fb_exceptions.InvalidArgumentError] * 2
    assert "not a valid FCM registration token" in str(responses[0].exception)
    assert "too big" in str(responses[1].exception)
    assert control.stats()["fcm"]["rejected"] == {"INVALID_ARGUMENT": 2}


def test_fcm_rate_limit_answers_quota_exceeded_with_retry_after(
    fcm: FcmSession, control: ProviderControl
) -> None:
    control.set_rate_limit("fcm", 3, retry_after_s=7)
    responses = fcm.send([messaging.Message(fid=FCM_TOKENS[0]) for _ in range(10)])
    ok = [r for r in responses if r.success]
    limited = [r for r in responses if isinstance(r.exception, messaging.QuotaExceededError)]
    assert 3 <= len(ok) <= 5 and len(ok) + len(limited) == 10
    assert {r.exception.http_response.headers["retry-after"] for r in limited} == {"7"}


@pytest.mark.parametrize(
    ("status", "error"), [(503, fb_exceptions.UnavailableError), (500, fb_exceptions.InternalError)]
)
def test_fcm_outage_then_recovery(
    fcm: FcmSession, control: ProviderControl, status: int, error: type[Exception]
) -> None:
    control.set_outage("fcm", 0.4, status=status)
    [during] = fcm.send([messaging.Message(fid=FCM_TOKENS[0])])
    assert isinstance(during.exception, error)
    time.sleep(0.5)
    [after] = fcm.send([messaging.Message(fid=FCM_TOKENS[0])])
    assert after.success


def test_fcm_builtin_retries_ride_out_a_short_outage(
    providers: LocalProviders, control: ProviderControl
) -> None:
    session = FcmSession(providers.info, retries=True)
    try:
        control.set_outage("fcm", 0.3)
        [response] = session.send([messaging.Message(fid=FCM_TOKENS[0])])
    finally:
        session.close()
    assert response.success
    assert control.stats()["fcm"]["rejected"]["UNAVAILABLE"] >= 1


def test_fcm_bad_bearer_is_unauthenticated(
    providers: LocalProviders, control: ProviderControl
) -> None:
    info = json.loads(json.dumps(providers.info))
    info["fcm"]["access_token"] = "wrong"
    bad, good = FcmSession(info, fixed_token=True), FcmSession(providers.info, fixed_token=True)
    try:
        [bad_response] = bad.send([messaging.Message(fid=FCM_TOKENS[0])])
        [good_response] = good.send([messaging.Message(fid=FCM_TOKENS[0])])
    finally:
        bad.close()
        good.close()
    assert isinstance(bad_response.exception, fb_exceptions.UnauthenticatedError)
    assert good_response.success
    stats = control.stats()["fcm"]
    assert stats["tokens_issued"] == 0  # fixed bearers: no token flow
    assert stats["rejected"] == {"UNAUTHENTICATED": 3}  # firebase-admin refreshes and retries twice


def test_fcm_latency_and_dry_run(fcm: FcmSession, control: ProviderControl) -> None:
    control.set_latency("fcm", 300)
    started = time.perf_counter()
    responses = fcm.send([messaging.Message(fid=t) for t in FCM_TOKENS], dry_run=True)
    elapsed = time.perf_counter() - started
    assert all(r.success for r in responses) and 0.3 <= elapsed < 1.5
    assert {r.message_id for r in responses} == {"projects/fanfare-local/messages/fake_message_id"}
    stats = control.stats()["fcm"]
    assert (stats["accepted"], stats["validated"]) == (0, len(FCM_TOKENS))


def test_fcm_over_tls_speaks_http2_as_to_the_real_fcm(
    providers: LocalProviders, control: ProviderControl
) -> None:
    control.set_token_errors("fcm", {FCM_TOKENS[1]: "UNREGISTERED"})
    session = FcmSession(providers.info, http2=True)
    try:
        ok, gone = session.send(
            [
                messaging.Message(fid=FCM_TOKENS[0], data={"notification_id": "n1"}),
                messaging.Message(fid=FCM_TOKENS[1]),
            ]
        )
    finally:
        session.close()
    assert ok.success and ok.message_id.startswith("projects/fanfare-local/messages/")
    assert isinstance(gone.exception, messaging.UnregisteredError)
    assert gone.exception.http_response.http_version == "HTTP/2"
    assert [r.notification_id for r in control.accepted("fcm")] == ["n1"]

    async def http11() -> httpx.Response:
        context = ssl.create_default_context(cafile=providers.info["fcm"]["ca_file"])
        async with httpx.AsyncClient(verify=context) as http:  # ALPN offers http/1.1 only
            return await http.post(
                providers.info["fcm"]["https_url"] + "/v1/projects/fanfare-local/messages:send",
                headers={"authorization": f"Bearer {providers.info['fcm']['access_token']}"},
                json={"message": {"token": FCM_TOKENS[2]}},
            )

    r = run(http11())
    assert (r.status_code, r.http_version) == (200, "HTTP/1.1")


def test_fcm_goaway_fails_sends_in_flight_though_fcm_delivered_them(
    providers: LocalProviders, control: ProviderControl
) -> None:
    session = FcmSession(providers.info, http2=True)

    async def goaway_soon() -> int:
        await asyncio.sleep(0.15)  # the sends below are in and recorded, their answers held back
        return await asyncio.to_thread(control.goaway, "fcm", 0)

    async def main() -> tuple[list[messaging.SendResponse], int]:
        messages = [
            messaging.Message(fid=t, data={"notification_id": f"n{i}"})
            for i, t in enumerate(FCM_TOKENS)
        ]
        sent, armed = await asyncio.gather(
            messaging.send_each_async(messages, app=session.app), goaway_soon()
        )
        return list(sent.responses), armed

    try:
        assert session.send([messaging.Message(fid=FCM_TOKENS[0])])[0].success  # connection up
        control.set_latency("fcm", 400)
        responses, armed = session.runner.run(main())
        control.set_latency("fcm", 0)
        [after] = session.send([messaging.Message(fid=FCM_TOKENS[0])])  # on a new connection
    finally:
        session.close()
    assert armed >= 1 and after.success
    # The GOAWAY promised answers for all of them, but httpx fails every stream open when it
    # arrives: firebase-admin reports UnknownError for sends FCM did accept.
    assert all(isinstance(r.exception, fb_exceptions.UnknownError) for r in responses)
    assert all("ConnectionTerminated" in str(r.exception) for r in responses)
    stats = control.stats()["fcm"]
    assert (stats["goaways_sent"], stats["accepted"]) == (1, 2 + len(FCM_TOKENS))


# control API and process mode


def test_accepted_pages_and_reset(providers: LocalProviders, control: ProviderControl) -> None:
    async def main() -> None:
        client = apns_client(providers.info)
        await asyncio.gather(
            *(
                send(client, message={"aps": {}, "notification_id": f"n{i}", "device_id": "d"})
                for i in range(25)
            )
        )
        await send(client, message={"aps": {}, "notification_id": "n0", "device_id": "d"})

    run(main())
    records = control.accepted("apns", page=4)
    assert len(records) == 26
    assert len(control.accepted("apns", since=20)) == 6
    stats = control.stats()["apns"]
    assert (stats["accepted"], stats["distinct"], stats["duplicates"]) == (26, 25, 1)
    control.reset("apns")
    assert control.accepted("apns") == [] and control.stats()["apns"]["requests"] == 0


def test_subprocess_mode_writes_providers_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = spawn_local_providers(tmp_path)
    try:
        info = json.loads((tmp_path / "providers.json").read_text())
        assert info["pid"] == proc.proc.pid
        assert set(info) == {"apns", "fcm", "channels", "control_url", "pid"}
        assert set(info["channels"]) >= {"smtp", "sms", "webpush", "chat", "control_url"}
        assert proc.control().health()

        async def main() -> NotificationResult:
            return await send(apns_client(proc.info))

        assert run(main()).status == "200"
        assert proc.control().stats()["apns"]["accepted"] == 1
        os.kill(proc.proc.pid, signal.SIGTERM)
        assert proc.proc.wait(timeout=10) == 0
        assert not (tmp_path / "providers.json").exists()
    finally:
        proc.stop()


def test_the_delivery_fcm_sender_speaks_http2_to_the_local_server_and_closes_in_its_loop(
    providers: LocalProviders, control: ProviderControl, tmp_path: Path
) -> None:
    from operators.adapters.providers.config import fcm_config
    from operators.adapters.providers.fcm import FcmSender
    from operators.config import load_settings
    from operators.delivery.model import RetryPolicy
    from operators.delivery.payloads import PushTemplate
    from operators.delivery.token_bucket import BucketSpec
    from scripts.dev.local_providers.settings_file import write_provider_settings
    from tests.fakes import request

    home = tmp_path / "home"
    write_provider_settings(home / "settings.env", providers.info)  # as `fanfare dev up` does
    config = fcm_config(load_settings({"FANFARE_HOME": str(home)}))
    assert config is not None
    assert config.url == providers.info["fcm"]["https_url"] and config.ca_file is not None
    control.set_token_errors("fcm", {FCM_TOKENS[1]: "UNREGISTERED"})

    async def scenario() -> list[Any]:
        sender = FcmSender(
            config,
            PushTemplate("{author_id} posted", "read it", "fanfare://posts/{post_id}"),
            BucketSpec("fcm:test", 60_000, 1.0, 0.0),
            RetryPolicy(),
            5.0,
            f"test-{uuid.uuid4().hex}",
        )
        reqs = [
            request(provider="fcm", token=FCM_TOKENS[i], user=f"u{i}", device=f"d{i}")
            for i in range(2)
        ]
        answers = await sender.send(reqs, [sender.render(r) for r in reqs])
        await sender.close()  # inside the running loop: must not raise
        return answers

    ok, gone = run(scenario())
    assert (ok.status, ok.reason) == (200, None)
    assert (gone.status, gone.reason) == (404, "UNREGISTERED")
    assert [r.notification_id for r in control.accepted("fcm")] == ["p1:u0"]


def test_the_delivery_senders_connect_and_authenticate_before_their_first_send(
    providers: LocalProviders, control: ProviderControl, tmp_path: Path
) -> None:
    """A connection or OAuth token made after a send's rate-limit token was taken
    delays that send (170 ms for FCM's first chunk), and the bucket's promise with it."""
    from operators.adapters.providers.apns import ApnsSender
    from operators.adapters.providers.config import apns_config, fcm_config
    from operators.adapters.providers.fcm import FcmSender
    from operators.config import load_settings
    from operators.delivery.model import ProviderAnswer, RetryPolicy
    from operators.delivery.payloads import PushTemplate
    from operators.delivery.token_bucket import BucketSpec
    from scripts.dev.local_providers.settings_file import write_provider_settings
    from tests.fakes import request

    home = tmp_path / "home"
    write_provider_settings(home / "settings.env", providers.info)
    settings = load_settings({"FANFARE_HOME": str(home)})
    apns, fcm = apns_config(settings), fcm_config(settings)
    assert apns is not None and fcm is not None
    template = PushTemplate("t", "b", "l")
    before = control.stats()

    async def scenario() -> None:
        senders = [
            ApnsSender(apns, template, BucketSpec("apns:t", 600), RetryPolicy(), 5.0),
            FcmSender(fcm, template, BucketSpec("fcm:t", 600), RetryPolicy(), 5.0),
        ]
        for sender in senders:
            await sender.warm_up()
        stats.append(control.stats())
        # A token about to expire is renewed after a send, not inside the next one.
        credential = senders[1]._service._credential
        credential.expiry = datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=2)
        req = request(provider="fcm", token=FCM_TOKENS[0])
        assert await senders[1].send([req], [senders[1].render(req)]) == [ProviderAnswer(200, None)]
        assert credential.expiry > datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=10)
        await senders[1].close()

    stats: list[Any] = []
    run(scenario())
    after, renewed = stats[0], control.stats()
    # FCM: one connection for the OAuth token (the local server also serves /token), one for
    # the sends.
    for name, connections in (("apns", 1), ("fcm", 2)):
        opened = after[name]["connections_total"] - before[name]["connections_total"]
        assert opened == connections, (name, before[name], after[name])
        assert after[name]["requests"] == before[name]["requests"]  # nothing was sent
    assert after["fcm"]["tokens_issued"] == before["fcm"]["tokens_issued"] + 1
    assert renewed["fcm"]["tokens_issued"] == after["fcm"]["tokens_issued"] + 1
