"""Local stand-ins for APNs and FCM, with a control API to inject faults and read what arrived.

In-process: `start_local_providers(home)`; as a subprocess: `spawn_local_providers(home)` or
`python -m scripts.dev.local_providers --dir DIR`. Both write `DIR/providers.json`.
"""

from scripts.dev.local_providers.control import (
    AcceptedRecord,
    ProviderControl,
    ProviderStats,
)
from scripts.dev.local_providers.control_api import ControlError
from scripts.dev.local_providers.credentials import LocalCredentials, make_local_credentials
from scripts.dev.local_providers.runner import (
    LocalProviders,
    ProvidersInfo,
    ProvidersProcess,
    load_info,
    spawn_local_providers,
    start_local_providers,
)

__all__ = [
    "AcceptedRecord",
    "ControlError",
    "LocalCredentials",
    "LocalProviders",
    "ProviderControl",
    "ProviderStats",
    "ProvidersInfo",
    "ProvidersProcess",
    "load_info",
    "make_local_credentials",
    "spawn_local_providers",
    "start_local_providers",
]
