"""The reason fanfare records for an FCM error, the same from both FCM clients.

firebase-admin raises its own exception class for each of FCM's own error codes (the
`FcmError` detail of an answer) and a platform error (Google's code, e.g. UNAVAILABLE) for
anything else. The firebase-admin sender (`fcm.py`) sees the class; the libcurl sender
(`fcm_curl.py`) reads the answer's code and names the class firebase-admin would raise, so both
record the same reason (docs/providers.md).
"""

from __future__ import annotations

# firebase-admin's class per FCM error code (APNS_AUTH_ERROR is a ThirdPartyAuthError there).
FCM_ERROR_CLASSES = {
    "APNS_AUTH_ERROR": "ThirdPartyAuthError",
    "QUOTA_EXCEEDED": "QuotaExceededError",
    "SENDER_ID_MISMATCH": "SenderIdMismatchError",
    "THIRD_PARTY_AUTH_ERROR": "ThirdPartyAuthError",
    "UNREGISTERED": "UnregisteredError",
}
# The reason recorded for each of those classes: FCM's code, not the platform code it subclasses
# (an UnregisteredError is a NotFoundError; the engine drops the token on UNREGISTERED).
_CLASS_REASONS = {
    "QuotaExceededError": "QUOTA_EXCEEDED",
    "SenderIdMismatchError": "SENDER_ID_MISMATCH",
    "ThirdPartyAuthError": "THIRD_PARTY_AUTH_ERROR",
    "UnregisteredError": "UNREGISTERED",
}


def fcm_reason(error_class: str | None, platform_code: str) -> str:
    """The reason of an FCM error: FCM's own code for its classes, else the platform code."""
    return _CLASS_REASONS.get(error_class or "", platform_code)
