"""Where and how to reach APNs and FCM: from the FANFARE_APNS_* / FANFARE_FCM_* settings.

Credentials come from files named in configuration; their contents are never logged and never
put in events. On the embedded stack, with no credentials configured, the local provider
servers started by `fanfare dev up` are used (their `providers.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _local_providers(settings: Settings) -> dict[str, Any] | None:
    path = settings.local_providers_dir / "providers.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def apns_config(settings: Settings) -> ApnsConfig | None:
    """APNs from FANFARE_APNS_*, else the local server; None when neither is there."""
    if settings.apns_key_file:
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
    local = _local_providers(settings)
    if local is None:
        return None
    a = local["apns"]
    return ApnsConfig(
        a["host"],
        int(a["port"]),
        Path(a["key_file"]),
        a["key_id"],
        a["team_id"],
        a["topic"],
        Path(a["ca_file"]),
    )


def fcm_config(settings: Settings) -> FcmConfig | None:
    """FCM from FANFARE_FCM_*, else the local server; None when neither is there."""
    if settings.fcm_credentials_file:
        path = Path(settings.fcm_credentials_file)
        try:
            project = json.loads(path.read_text())["project_id"]
        except (OSError, ValueError, KeyError) as exc:
            # Say which file and why, never what is in it.
            raise ProviderConfigError(
                f"FANFARE_FCM_CREDENTIALS_FILE={path}: not a service-account JSON with a "
                f"project_id ({type(exc).__name__})"
            ) from None
        return FcmConfig(settings.fcm_url.rstrip("/"), path, project)
    local = _local_providers(settings)
    if local is None:
        return None
    f = local["fcm"]
    # Its TLS endpoint speaks HTTP/2 as FCM does (about twice the sends/s of HTTP/1.1 here).
    url, ca = (f["https_url"], Path(f["ca_file"])) if f.get("https_url") else (f["url"], None)
    return FcmConfig(url.rstrip("/"), Path(f["credentials_file"]), f["project_id"], ca)
