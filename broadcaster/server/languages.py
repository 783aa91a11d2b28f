"""Choosing the status page's language from a browser's `Accept-Language` header.

Starlette has no parser for it and Werkzeug's is not a dependency, so this is a small
one after RFC 9110 (§12.4.2 weights, §12.5.4 Accept-Language) and RFC 4647 (lookup).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["negotiate_language", "parse_accept_language"]

# RFC 4647 language-range: 1*8ALPHA *("-" 1*8alphanum), or "*".
_RANGE = re.compile(r"^(?:\*|[a-z]{1,8}(?:-[a-z0-9]{1,8})*)$", re.IGNORECASE)
# RFC 9110 qvalue: 0 to 1 with at most three decimals.
_QVALUE = re.compile(r"^(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)$")
# A browser sends a handful; a header of thousands is not worth parsing.
_MAX_RANGES = 32


def parse_accept_language(header: str | None) -> list[tuple[str, float]]:
    """(lower-case range, weight) pairs, most wanted first, ties in header order.

    Malformed items are skipped, not the whole header: one odd entry should not
    cost a visitor their language.
    """
    ranges: list[tuple[str, float]] = []
    for item in (header or "").split(",")[:_MAX_RANGES]:
        tag, *params = (part.strip() for part in item.split(";"))
        if not _RANGE.match(tag):
            continue
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                weight = float(value) if _QVALUE.match(value) else -1.0
        if weight >= 0:
            ranges.append((tag.lower(), weight))
    return sorted(ranges, key=lambda pair: -pair[1])  # sorted() is stable


def negotiate_language(header: str | None, available: Sequence[str], default: str) -> str:
    """The best of `available` for an `Accept-Language` header; `default` when none fits.

    Each wanted range, best first, is looked up RFC 4647 style: `fr-CH` takes `fr-CH`,
    then any `fr-CH-…`, then `fr`; `fr` also takes a configured `fr-CA`. `*` takes the
    default. A range with `q=0` rules that language out.
    """
    by_lower = {language.lower(): language for language in available}
    ranges = parse_accept_language(header)
    refused = {tag for tag, weight in ranges if weight == 0}
    allowed = [lower for lower in by_lower if lower not in refused]
    for tag, weight in ranges:
        if weight == 0:
            break  # sorted: only refusals follow
        if tag == "*":
            if default.lower() in allowed:
                return default
            if allowed:
                return by_lower[allowed[0]]
            continue
        wanted = tag
        while wanted:
            exact = [lower for lower in allowed if lower == wanted]
            longer = [lower for lower in allowed if lower.startswith(wanted + "-")]
            if exact or longer:
                return by_lower[(exact or longer)[0]]
            wanted = wanted.rpartition("-")[0]
    return default
