"""Where and how to reach APNs and FCM: from the FANFARE_APNS_* / FANFARE_FCM_* settings.

Credentials come from files named in configuration; their contents are never logged and never
put in events. On the embedded stack, `fanfare dev up` writes the local provider servers'
settings into the settings file (`FANFARE_SETTINGS_FILE`), which `load_settings` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from operators.config import Settings


class ProviderConfigError(RuntimeError):
    """Provider credentials are missing or unusable; the message says what to set."""


@dataclass(frozen=True, slots=True)
class ApnsConfig:
    """Where and how to reach APNs."""

    host: str
    port: int
    key_file: Path
    key_id: str
    team_id: str
    topic: str
    ca_file: Path | None


@dataclass(frozen=True, slots=True)
class FcmConfig:
    """Where and how to reach FCM."""

    url: str
    credentials_file: Path
    project_id: str
    ca_file: Path | None = None  # a private CA (the local server); None = the system's


def apns_config(settings: Settings) -> ApnsConfig | None:
    """APNs from the FANFARE_APNS_* settings; None when no key is configured."""
    if not settings.apns_key_file:
        return None
    missing = [
        name
        for name, value in (
            ("FANFARE_APNS_KEY_ID", settings.apns_key_id),
            ("FANFARE_APNS_TEAM_ID", settings.apns_team_id),
            ("FANFARE_APNS_TOPIC", settings.apns_topic),
        )
        if not value
    ]
    if missing:
        raise ProviderConfigError(f"FANFARE_APNS_KEY_FILE is set but {', '.join(missing)} not")
    return ApnsConfig(
        settings.apns_host,
        settings.apns_port,
        Path(settings.apns_key_file),
        settings.apns_key_id,
        settings.apns_team_id,
        settings.apns_topic,
        Path(settings.apns_ca_file) if settings.apns_ca_file else None,
    )


def fcm_config(settings: Settings) -> FcmConfig | None:
    """FCM from the FANFARE_FCM_* settings; None when no service account is configured."""
    if not settings.fcm_credentials_file:
        return None
    path = Path(settings.fcm_credentials_file)
    try:
        project = json.loads(path.read_text())["project_id"]
    except (OSError, ValueError, KeyError) as exc:
        # Say which file and why, never what is in it.
        raise ProviderConfigError(
            f"FANFARE_FCM_CREDENTIALS_FILE={path}: not a service-account JSON with a "
            f"project_id ({type(exc).__name__})"
        ) from None
    ca_file = Path(settings.fcm_ca_file) if settings.fcm_ca_file else None
    return FcmConfig(settings.fcm_url.rstrip("/"), path, project, ca_file)
