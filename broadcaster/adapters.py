"""Finding adapters (entry-point group `broadcaster.channels`) and building channel instances."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from pydantic import ValidationError

from broadcaster.config import Settings, describe_validation_error
from broadcaster.errors import ConfigError

if TYPE_CHECKING:
    from channels.base import Channel, ChannelContext

ENTRY_POINT_GROUP = "broadcaster.channels"


def adapter_names() -> list[str]:
    """Every installed adapter type."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_adapter(type_name: str) -> type[Channel]:
    """The adapter class for a channel `type`; its SDK is imported only when it starts."""
    from channels.base import Channel

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
    if not found:
        known = ", ".join(adapter_names()) or "none installed"
        raise ConfigError(f"unknown channel type '{type_name}' — installed types: {known}")
    adapter = found[0].load()
    if not (isinstance(adapter, type) and issubclass(adapter, Channel)):
        raise ConfigError(f"entry point '{type_name}' is not a channel adapter")
    return adapter


def build_channels(settings: Settings, context: ChannelContext) -> dict[str, Channel]:
    """Every configured channel instance, its config validated by its adapter's model."""
    channels: dict[str, Channel] = {}
    for name, raw in settings.channels.items():
        if "type" not in raw:
            raise ConfigError(
                f"{settings.config_path or 'settings'}: channels.{name}.type: missing "
                f"(one of {', '.join(adapter_names())})"
            )
        adapter = load_adapter(str(raw["type"]))
        try:
            config = adapter.config_model.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                describe_validation_error(exc, settings.config_path, prefix=f"channels.{name}")
            ) from None
        channels[name] = adapter(name, config, context)
    unknown = [c for c in settings.default_channels if c not in channels]
    if unknown:
        raise ConfigError(
            f"{settings.config_path or 'settings'}: default_channels: unknown channel "
            f"'{unknown[0]}' — configured: {', '.join(channels) or 'none'}"
        )
    _check_fallbacks(settings, channels)
    return channels


def _check_fallbacks(settings: Settings, channels: dict[str, Channel]) -> None:
    """A fallback naming a channel that cannot take a subscriber's delivery would only be
    found out mid-outage, when the primary fails: refuse it when the config loads."""
    for name, channel in channels.items():
        fallback = channel.config.fallback
        if fallback is None:
            continue
        where = f"{settings.config_path or 'settings'}: channels.{name}.fallback"
        if channel.address_kind is None:
            raise ConfigError(
                f"{where}: only a subscriber channel (sms, email) has a fallback — "
                f"'{name}' posts to its own audience"
            )
        target = channels.get(fallback)
        if target is None or target.address_kind is None or fallback == name:
            others = [n for n, c in channels.items() if c.address_kind and n != name]
            raise ConfigError(
                f"{where}: '{fallback}' is not another subscriber channel — configured: "
                f"{', '.join(others) or 'none'}"
            )
