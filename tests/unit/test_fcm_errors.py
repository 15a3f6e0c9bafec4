"""Both FCM clients record the same reason for an FCM error (no server: answers built here)."""

from __future__ import annotations

import orjson
import pytest
from firebase_admin import exceptions, messaging

from operators.adapters.providers.curl_multi import CurlAnswer
from operators.adapters.providers.fcm_curl import fcm_answer
from operators.adapters.providers.fcm_errors import FCM_ERROR_CLASSES, fcm_reason


def firebase_admin_reason(exc: exceptions.FirebaseError) -> str:
    """What the firebase-admin sender records for an exception it got back."""
    return fcm_reason(type(exc).__name__, str(exc.code).upper())


def test_the_error_classes_are_firebase_admin_s_own() -> None:
    # firebase-admin's table of FCM error codes: the libcurl client names the same class.
    theirs = messaging._MessagingService.FCM_ERROR_TYPES
    assert {code: cls.__name__ for code, cls in theirs.items()} == FCM_ERROR_CLASSES


@pytest.mark.parametrize(
    ("fcm_code", "status", "platform"),
    [
        ("UNREGISTERED", 404, "NOT_FOUND"),
        ("SENDER_ID_MISMATCH", 403, "PERMISSION_DENIED"),
        ("QUOTA_EXCEEDED", 429, "RESOURCE_EXHAUSTED"),
        ("THIRD_PARTY_AUTH_ERROR", 401, "UNAUTHENTICATED"),
        ("APNS_AUTH_ERROR", 401, "UNAUTHENTICATED"),
    ],
)
def test_an_fcm_error_code_reads_the_same_from_both_clients(
    fcm_code: str, status: int, platform: str
) -> None:
    error_class = messaging._MessagingService.FCM_ERROR_TYPES[fcm_code]
    from_admin = firebase_admin_reason(error_class("m"))
    body = {
        "error": {
            "status": platform,
            "message": "m",
            "details": [
                {
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": fcm_code,
                }
            ],
        }
    }
    from_curl = fcm_answer(CurlAnswer(status, orjson.dumps(body))).reason
    assert from_admin == from_curl != platform  # FCM's own code, not the platform's


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (exceptions.UnavailableError("m"), 503),
        (exceptions.InternalError("m"), 500),
        (exceptions.InvalidArgumentError("m"), 400),
    ],
)
def test_a_platform_error_reads_the_same_from_both_clients(
    exc: exceptions.FirebaseError, status: int
) -> None:
    from_curl = fcm_answer(CurlAnswer(status, b"<html>proxy error</html>")).reason
    assert firebase_admin_reason(exc) == from_curl == exc.code


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", {}),
        (b"<html>bad gateway</html>", {}),
        (b"[1, 2]", {}),
        (b'{"reason": "BadDeviceToken"}', {"reason": "BadDeviceToken"}),
    ],
)
def test_an_answer_body_reads_as_a_json_object_or_nothing(
    body: bytes, expected: dict[str, str]
) -> None:
    assert CurlAnswer(400, body).json_object() == expected
