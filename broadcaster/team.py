"""Telling the team: a plain message to one of the team's own chat channels (a nudge, a
person's SMS reply, a missed promise). One try per target, not a tracked delivery: the
caller records what happened."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from broadcaster.errors import DeliveryError
from broadcaster.models import ChannelFamily, ChannelRender, Rendered
from broadcaster.text import truncate
from channels.base import Channel, Message, Recipient

__all__ = ["TEAM_TIMEOUT_SECONDS", "team_channel_problem", "tell_team"]

TEAM_TIMEOUT_SECONDS = 30.0
MAX_TEAM_MESSAGE = 4000


def team_channel_problem(channels: Mapping[str, Channel], target: str, setting: str) -> str | None:
    """Why `target` cannot be the team's channel (named by `setting` in errors), or None.

    Only a chat channel (Slack, Discord, Teams, Telegram) or a webhook to the team's own
    tools (it posts `{"type": "team.message"}`): a social channel would publish what is
    meant for the team to the world, a status page would show it as an incident update,
    and a subscriber channel would send it to subscribers."""
    channel = channels.get(target)
    if channel is None:
        configured = ", ".join(channels) or "none"
        return f"{setting}: unknown channel '{target}' — configured: {configured}"
    internal = channel.family is ChannelFamily.CHAT or channel.config.type == "webhook"
    if not internal or channel.address_kind is not None:
        return (
            f"{setting}: '{target}' is a {channel.config.type} channel — name the team's own "
            "chat channel (Slack, Discord, Teams, a private Telegram group) or a webhook"
        )
    return None


async def tell_team(channel: Channel, text: str, *, kind: str, reference: str) -> str | None:
    """Send `text` to every target of a team chat channel, in its first language; why it
    failed (all targets' errors), or None. `kind` and `reference` make the delivery key
    (a webhook-style receiver can drop a repeat)."""
    language = channel.languages[0]
    limits = channel.instance_limits
    limit = min(
        x for x in (limits.max_graphemes, limits.max_chars, MAX_TEAM_MESSAGE) if x is not None
    )
    render = ChannelRender(
        channel=channel.name,
        family=channel.family,
        template=kind,
        variants=[Rendered(language=language, text=truncate(text, limit))],
        joined=False,
    )
    # The dispatcher starts every channel while it runs; this process may not be the one
    # holding its lease (start is idempotent).
    await channel.start()
    errors = []
    for recipient in channel.recipients():
        message = Message(
            render=render,
            recipient=Recipient(id=recipient.id, language=language),
            thread=None,
            incident_id=0,
            update_id=0,
            delivery_key=f"{kind}:{reference}:{recipient.id}",
        )
        try:
            async with asyncio.timeout(TEAM_TIMEOUT_SECONDS):
                await channel.send(message)
        except DeliveryError as exc:
            errors.append(str(exc))
        except TimeoutError:
            errors.append(f"{channel.name}: no answer within {TEAM_TIMEOUT_SECONDS:.0f} s")
    return "; ".join(errors) or None
