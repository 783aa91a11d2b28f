"""Measuring text the way providers do: graphemes, SMS septets and segments, links.

Providers do not count `len()`: Bluesky counts grapheme clusters, SMS gateways count
GSM 03.38 septets or UTF-16 code units, X/Twitter counts every link as a fixed length.
Everything that enforces a channel's limit measures with the functions here.
"""

from __future__ import annotations

import unicodedata
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum

import regex

__all__ = [
    "SmsEncoding",
    "SmsMeasure",
    "find_links",
    "grapheme_count",
    "grapheme_count_with_links",
    "heading_words",
    "link_problems",
    "measure_sms",
    "sms_encoding",
    "split_graphemes",
    "to_gsm7",
    "truncate",
]

_GRAPHEME = regex.compile(r"\X")
# A chat-family template marks its heading line *like this* (Slack's mrkdwn bold); the
# title inside may hold asterisks of its own.
_HEADING_LINE = regex.compile(r"\*([^\n]+)\*")


def heading_words(line: str) -> str | None:
    """The words of a chat template's `*heading*` line, or None for any other line; each
    chat adapter shows them in its own bold (HTML, Markdown, a card's weight)."""
    match = _HEADING_LINE.fullmatch(line)
    return match[1] if match else None


def split_graphemes(text: str) -> list[str]:
    """Split text into user-perceived characters (Unicode extended grapheme clusters)."""
    graphemes: list[str] = _GRAPHEME.findall(text)
    return graphemes


def grapheme_count(text: str) -> int:
    """Number of user-perceived characters, as Bluesky and most UIs count them."""
    return len(split_graphemes(text))


# --- SMS ---------------------------------------------------------------------------

# GSM 03.38 default alphabet, in table order; 0x1B (ESC) is left out because it is
# the escape into the extension table, not a character a message can contain.
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each is sent as ESC + char, so it costs two septets.
_GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
_GSM7 = _GSM7_BASIC | _GSM7_EXTENSION

# Single-part limits, and per-part limits once the 6-octet concatenation header
# (UDH) is taken out of each 140-octet part.
_GSM7_SINGLE, _GSM7_PART = 160, 153
_UCS2_SINGLE, _UCS2_PART = 70, 67


class SmsEncoding(StrEnum):
    """How an SMS is encoded on the wire; UCS-2 as sent is really UTF-16."""

    GSM7 = "GSM-7"
    UCS2 = "UCS-2"


@dataclass(frozen=True)
class SmsMeasure:
    """What an SMS costs: `units` are septets (GSM-7) or UTF-16 code units (UCS-2)."""

    encoding: SmsEncoding
    units: int
    segments: int
    per_segment: int


def sms_encoding(text: str) -> SmsEncoding:
    """GSM-7 if every character is in the GSM 03.38 basic or extension table, else UCS-2."""
    return SmsEncoding.GSM7 if all(c in _GSM7 for c in text) else SmsEncoding.UCS2


def _sms_unit_costs(text: str, encoding: SmsEncoding) -> list[int]:
    """Units per character; a character's units must travel in the same segment."""
    if encoding is SmsEncoding.GSM7:
        return [2 if c in _GSM7_EXTENSION else 1 for c in text]
    return [2 if ord(c) > 0xFFFF else 1 for c in text]


def measure_sms(text: str) -> SmsMeasure:
    """Encoding, units and segment count of an SMS; "" is 0 segments.

    Multi-part messages are counted by packing, not by ceil(): handsets and gateways
    never split a GSM-7 escape pair or a UTF-16 surrogate pair across two parts, so a
    pair that straddles a boundary moves whole to the next part.
    """
    encoding = sms_encoding(text)
    single, part = (
        (_GSM7_SINGLE, _GSM7_PART) if encoding is SmsEncoding.GSM7 else (_UCS2_SINGLE, _UCS2_PART)
    )
    costs = _sms_unit_costs(text, encoding)
    units = sum(costs)
    if units <= single:
        return SmsMeasure(encoding, units, 1 if text else 0, single)
    segments, used = 1, 0
    for cost in costs:
        if used + cost > part:
            segments, used = segments + 1, 0
        used += cost
    return SmsMeasure(encoding, units, segments, part)


# unidecode yields ASCII, and these are the only ASCII characters GSM-7 lacks that
# have a sensible stand-in; any other (control characters) becomes "?".
_GSM7_ASCII_FALLBACK = {"\t": " ", "`": "'"}


def to_gsm7(text: str) -> str:
    """Transliterate text so it fits GSM-7 (one SMS part holds 160 chars, not 70).

    Characters already in GSM-7 (é, ñ, Ø, €...) are kept; every other grapheme is
    transliterated by unidecode (ê -> e, œ -> oe, “ -> "), or dropped if it has no
    transliteration (emoji).
    """
    from unidecode import unidecode  # only SMS channels need it; keep imports cheap

    out: list[str] = []
    for grapheme in split_graphemes(text):
        if all(c in _GSM7 for c in grapheme):
            out.append(grapheme)
            continue
        # A decomposed "e\u0301" is the GSM-7 "é" once composed.
        composed = unicodedata.normalize("NFC", grapheme)
        if all(c in _GSM7 for c in composed):
            out.append(composed)
            continue
        out.extend(
            c if c in _GSM7 else _GSM7_ASCII_FALLBACK.get(c, "?") for c in unidecode(composed)
        )
    return "".join(out)


# --- Truncation --------------------------------------------------------------------

# Dangling before an ellipsis these read as a mistake ("we are investigating,…").
_TRAILING_PUNCTUATION = frozenset(",;:-\u2013\u2014")  # hyphen, en and em dash


def _is_trailing_junk(grapheme: str) -> bool:
    return grapheme.isspace() or grapheme in _TRAILING_PUNCTUATION


def truncate(text: str, max_graphemes: int, *, ellipsis: str = "…") -> str:
    """Shorten text to at most max_graphemes graphemes, ellipsis included.

    Text that fits is returned unchanged. Otherwise it is cut at the last whitespace
    that leaves room for the ellipsis, dropping trailing whitespace and ",;:-" first;
    if not even the first word fits it is cut between graphemes. It is never cut
    inside a grapheme. A limit smaller than the ellipsis gets as much of the ellipsis
    as fits.
    """
    if max_graphemes < 0:
        raise ValueError(f"max_graphemes must be >= 0, got {max_graphemes}")
    graphemes = split_graphemes(text)
    if len(graphemes) <= max_graphemes:
        return text
    ellipsis_graphemes = split_graphemes(ellipsis)
    budget = max_graphemes - len(ellipsis_graphemes)
    if budget < 0:
        return "".join(ellipsis_graphemes[:max_graphemes])

    # graphemes[budget] exists because the text does not fit, so a cut at i keeps
    # graphemes[:i] and ends a word when graphemes[i] is whitespace.
    for end in range(budget, 0, -1):
        if not graphemes[end].isspace():
            continue
        kept = graphemes[:end]
        while kept and _is_trailing_junk(kept[-1]):
            kept.pop()
        if kept:
            return "".join(kept) + ellipsis
    return "".join(graphemes[:budget]) + ellipsis


# --- Links -------------------------------------------------------------------------

# A link runs from the scheme to the next whitespace; what it should not contain is
# for link_problems to report, not for the pattern to silently cut off.
_LINK = regex.compile(r"(?<![\w.+-])https?://\S*", regex.IGNORECASE)
# Sentence punctuation right after a link belongs to the sentence, not the link.
_LINK_TRAILING = ".,;:!?'\"…"
_LINK_CLOSERS = {")": "(", "]": "[", ">": "<"}


def _link_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for match in _LINK.finditer(text):
        start: int = match.start()
        end: int = match.end()
        while end > start:
            last = text[end - 1]
            link = text[start:end]
            opener = _LINK_CLOSERS.get(last)
            # "(see https://example.com/a)" ends the link before ")", but a
            # balanced "https://en.wikipedia.org/wiki/Mercury_(planet)" keeps it.
            if last in _LINK_TRAILING or (
                opener is not None and link.count(opener) < link.count(last)
            ):
                end -= 1
            else:
                break
        spans.append((start, end))
    return spans


def find_links(text: str) -> list[str]:
    """The http:// and https:// links in text, without trailing sentence punctuation."""
    return [text[start:end] for start, end in _link_spans(text)]


# Characters RFC 3986 never allows in a URL, and which templating leftovers
# ("https://{{url}}") and pasted markup typically bring in.
_URL_FORBIDDEN = frozenset('{}<>"\\^`|')
_HOST_EXTRA_CHARS = frozenset("-._")
# What follows "https://exa mple.com" after the space: something with a dot or slash.
_SPACED_CONTINUATION = regex.compile(r"[ \t]+([^\s/]*[./][^\s]*)")


def _link_problem(link: str) -> str | None:
    """Why link is malformed, or None if it looks deliverable."""
    bad = next((c for c in link if c in _URL_FORBIDDEN or not c.isprintable()), None)
    if bad is not None:
        return f"contains {bad!r}, which is not allowed in a link"
    try:
        parts = urllib.parse.urlsplit(link)
        host = parts.hostname
        host_and_port = parts.netloc.rpartition("@")[2]
    except ValueError as exc:
        return f"cannot be parsed ({exc})"
    if not host:
        return "no host"
    if host.startswith("[") or ":" in host:  # IPv6 literal; urllib has checked it
        port_text = host_and_port.rpartition("]")[2].removeprefix(":")
    else:
        port_text = host_and_port.partition(":")[2]
        if "." not in host and host != "localhost":
            return f"host '{host}' has no dot"
        if "" in host.rstrip(".").split("."):
            return f"host '{host}' has an empty label"
        bad = next((c for c in host if not (c.isalnum() or c in _HOST_EXTRA_CHARS)), None)
        if bad is not None:
            return f"host '{host}' contains {bad!r}"
    if port_text and not (port_text.isdigit() and 0 < int(port_text) <= 65535):
        return f"invalid port '{port_text}'"
    return None


def link_problems(text: str) -> list[str]:
    """One message per malformed link in text, e.g. "malformed link 'http://': no host"."""
    problems: list[str] = []
    for start, end in _link_spans(text):
        link = text[start:end]
        reason = _link_problem(link)
        # "https://exa mple.com" is found as "https://exa" (no dot); name the whole
        # thing and the real mistake, which is the space.
        if reason is not None and reason.endswith("has no dot"):
            continuation = _SPACED_CONTINUATION.match(text, end)
            if continuation is not None:
                tail: str = continuation.group(1).rstrip(_LINK_TRAILING)
                if "." in tail.rstrip(".") or "/" in tail:
                    link = text[start : continuation.start(1)] + tail
                    reason = "contains a space"
        if reason is not None:
            problems.append(f"malformed link '{link}': {reason}")
    return problems


def grapheme_count_with_links(text: str, link_length: int | None) -> int:
    """Grapheme count where each link counts as link_length (X/Twitter's t.co rule).

    With link_length None this is grapheme_count(text).
    """
    if link_length is None:
        return grapheme_count(text)
    spans = _link_spans(text)
    # A grapheme that starts inside a link is paid for by the link's fixed length.
    outside = sum(
        1
        for match in _GRAPHEME.finditer(text)
        if not any(start <= match.start() < end for start, end in spans)
    )
    return outside + link_length * len(spans)
