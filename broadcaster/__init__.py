"""incident-broadcaster: tell users on every channel at once that a service is down.

The public Python API. Names are imported on first use, so `broadcaster --help` does not
pay for the store, the settings machinery or any provider SDK.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broadcaster.config import Settings, load_settings
    from broadcaster.core import Broadcaster, DoctorCheck, PublishResult
    from broadcaster.errors import (
        BroadcasterError,
        ChannelBrokenError,
        CheckFailedError,
        ConfigError,
        NotFoundError,
        PermanentError,
        TransientError,
    )
    from broadcaster.models import (
        ChannelProgress,
        ComponentState,
        Delivery,
        DeliveryState,
        Impact,
        Incident,
        IncidentStatus,
        Preview,
        Update,
        UpdateRequest,
    )

_EXPORTS = {
    "Broadcaster": "broadcaster.core",
    "DoctorCheck": "broadcaster.core",
    "PublishResult": "broadcaster.core",
    "Settings": "broadcaster.config",
    "load_settings": "broadcaster.config",
    "BroadcasterError": "broadcaster.errors",
    "ChannelBrokenError": "broadcaster.errors",
    "CheckFailedError": "broadcaster.errors",
    "ConfigError": "broadcaster.errors",
    "NotFoundError": "broadcaster.errors",
    "PermanentError": "broadcaster.errors",
    "TransientError": "broadcaster.errors",
    "ChannelProgress": "broadcaster.models",
    "ComponentState": "broadcaster.models",
    "Delivery": "broadcaster.models",
    "DeliveryState": "broadcaster.models",
    "Impact": "broadcaster.models",
    "Incident": "broadcaster.models",
    "IncidentStatus": "broadcaster.models",
    "Preview": "broadcaster.models",
    "Update": "broadcaster.models",
    "UpdateRequest": "broadcaster.models",
}

__all__ = [
    "Broadcaster",
    "BroadcasterError",
    "ChannelBrokenError",
    "ChannelProgress",
    "CheckFailedError",
    "ComponentState",
    "ConfigError",
    "Delivery",
    "DeliveryState",
    "DoctorCheck",
    "Impact",
    "Incident",
    "IncidentStatus",
    "NotFoundError",
    "PermanentError",
    "Preview",
    "PublishResult",
    "Settings",
    "TransientError",
    "Update",
    "UpdateRequest",
    "load_settings",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'broadcaster' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
