"""Text is measured the way providers measure it: graphemes, SMS segments, links."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broadcaster.text import (
    SmsEncoding,
    SmsMeasure,
    find_links,
    grapheme_count,
    grapheme_count_with_links,
    link_problems,
    measure_sms,
    sms_encoding,
    split_graphemes,
    to_gsm7,
    truncate,
)

FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"  # 👨‍👩‍👧‍👦
FLAG_FR = "\U0001f1eb\U0001f1f7"  # 🇫🇷
THUMBS_UP_MEDIUM = "\U0001f44d\U0001f3fd"  # 👍🏽
GRINNING = "\U0001f600"  # 😀, a surrogate pair in UTF-16

# The example: one "ê" forces UCS-2 and triples the cost of a 141-char SMS.
FRENCH = (
    "Nous enquêtons sur un problème de connexion à l'application mobile. "
    "Les paiements ne sont pas touchés. Prochaine mise à jour dans 30 minutes."
)

GSM7_ALPHABET = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
    "\f^{}\\[~]|€"
)


# --- Graphemes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(FAMILY, 1, id="zwj-family"),
        pytest.param(FLAG_FR, 1, id="flag"),
        pytest.param("e\u0301", 1, id="e-combining-acute"),
        pytest.param("\u00e9", 1, id="e-acute-precomposed"),
        pytest.param("\u1100\u1161\u11a8", 1, id="hangul-jamo-lvt"),
        pytest.param(THUMBS_UP_MEDIUM, 1, id="skin-tone-modifier"),
        pytest.param("\r\n", 1, id="crlf"),
        pytest.param("", 0, id="empty"),
        pytest.param(f"a{FAMILY}b{FLAG_FR}", 4, id="mixed"),
    ],
)
def test_grapheme_count_counts_user_perceived_characters(text: str, expected: int) -> None:
    assert grapheme_count(text) == expected


def test_split_graphemes_keeps_clusters_whole() -> None:
    assert split_graphemes(f"e\u0301{FLAG_FR}{FLAG_FR}{THUMBS_UP_MEDIUM}!") == [
        "e\u0301",
        FLAG_FR,
        FLAG_FR,
        THUMBS_UP_MEDIUM,
        "!",
    ]


@settings(max_examples=200)
@given(st.text(), st.text())
def test_grapheme_count_of_concatenation_is_at_most_the_sum(a: str, b: str) -> None:
    assert grapheme_count(a + b) <= grapheme_count(a) + grapheme_count(b)


# --- SMS -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "units", "segments", "per_segment"),
    [
        pytest.param("", 0, 0, 160, id="empty"),
        pytest.param("a", 1, 1, 160, id="one-char"),
        pytest.param("a" * 160, 160, 1, 160, id="160-fits-one"),
        pytest.param("a" * 161, 161, 2, 153, id="161-needs-two"),
        pytest.param("a" * 306, 306, 2, 153, id="153x2-is-two"),
        pytest.param("a" * 307, 307, 3, 153, id="307-needs-three"),
    ],
)
def test_gsm7_segments(text: str, units: int, segments: int, per_segment: int) -> None:
    m = measure_sms(text)
    assert m.encoding is SmsEncoding.GSM7
    assert (m.units, m.segments, m.per_segment) == (units, segments, per_segment)


def test_gsm7_extension_char_costs_two_septets() -> None:
    assert sms_encoding("€") is SmsEncoding.GSM7
    assert measure_sms("€").units == 2
    assert measure_sms("{[~]}").units == 10
    assert measure_sms("€" * 80).segments == 1
    assert measure_sms("€" * 81).segments == 2


def test_gsm7_escape_pair_at_part_boundary_moves_to_next_part() -> None:
    # 152 + 2 + 152 = 306 septets: ceil(306 / 153) = 2, but the "€" cannot be split
    # after septet 152, so the first part carries only 152 and a third part is needed.
    text = "a" * 152 + "€" + "a" * 152
    m = measure_sms(text)
    assert m.units == 306
    assert math.ceil(m.units / m.per_segment) == 2
    assert m.segments == 3


@pytest.mark.parametrize(
    ("text", "units", "segments", "per_segment"),
    [
        pytest.param("ê" * 70, 70, 1, 70, id="70-fits-one"),
        pytest.param("ê" * 71, 71, 2, 67, id="71-needs-two"),
        pytest.param("ê" * 134, 134, 2, 67, id="67x2-is-two"),
        pytest.param("ê" * 135, 135, 3, 67, id="135-needs-three"),
    ],
)
def test_ucs2_segments(text: str, units: int, segments: int, per_segment: int) -> None:
    m = measure_sms(text)
    assert m.encoding is SmsEncoding.UCS2
    assert (m.units, m.segments, m.per_segment) == (units, segments, per_segment)


def test_ucs2_emoji_costs_two_units() -> None:
    assert measure_sms(GRINNING) == SmsMeasure(
        SmsEncoding.UCS2, units=2, segments=1, per_segment=70
    )
    assert measure_sms(GRINNING * 35).segments == 1
    assert measure_sms(GRINNING * 36).segments == 2


def test_ucs2_surrogate_pair_at_part_boundary_moves_to_next_part() -> None:
    # 66 + 2 + 66 = 134 units = 2 x 67, but the emoji cannot start at unit 67.
    text = "ê" * 66 + GRINNING + "ê" * 66
    m = measure_sms(text)
    assert m.units == 134
    assert math.ceil(m.units / m.per_segment) == 2
    assert m.segments == 3


def test_french_update_costs_three_parts_until_transliterated() -> None:
    assert 135 <= len(FRENCH) <= 160
    raw = measure_sms(FRENCH)
    assert raw.encoding is SmsEncoding.UCS2
    assert raw.segments == 3

    gsm = to_gsm7(FRENCH)
    assert gsm.startswith("Nous enquetons sur un problème de connexion à l'application")
    cheap = measure_sms(gsm)
    assert cheap.encoding is SmsEncoding.GSM7
    assert cheap.segments == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("ê ô", "e o", id="circumflex"),
        pytest.param("œuvre", "oeuvre", id="ligature"),
        pytest.param("\u2018quoted\u2019 \u201cquoted\u201d", "'quoted' \"quoted\"", id="quotes"),
        pytest.param("10\u201312", "10-12", id="en-dash"),
        pytest.param("wait\u2026", "wait...", id="ellipsis"),
        pytest.param(f"down {GRINNING}!", "down !", id="emoji-dropped"),
        pytest.param("e\u0301", "é", id="decomposed-gsm-char-composed"),
        pytest.param("a\tb`", "a b'", id="ascii-without-gsm-equivalent"),
        pytest.param("\x00", "?", id="unmappable-becomes-question-mark"),
    ],
)
def test_to_gsm7_transliterates(text: str, expected: str) -> None:
    assert to_gsm7(text) == expected


def test_to_gsm7_keeps_gsm7_characters_including_accents() -> None:
    text = "é è ù ì ò Ç Ø å Ä Ö Ñ Ü § ¿ ¡ à ä ö ñ ü É ß Æ æ € {}"
    assert to_gsm7(text) == text
    assert to_gsm7(GSM7_ALPHABET) == GSM7_ALPHABET


@settings(max_examples=300)
@given(st.text())
def test_to_gsm7_always_yields_gsm7(text: str) -> None:
    assert sms_encoding(to_gsm7(text)) is SmsEncoding.GSM7


@settings(max_examples=100)
@given(st.text(alphabet=GSM7_ALPHABET))
def test_to_gsm7_leaves_gsm7_text_alone(text: str) -> None:
    assert to_gsm7(text) == text


sms_texts = st.one_of(
    st.text(alphabet=GSM7_ALPHABET, max_size=400),
    st.text(max_size=300),
    st.text(alphabet="aê€" + GRINNING, max_size=400),
)


@settings(max_examples=300)
@given(sms_texts)
def test_sms_segments_are_never_fewer_than_ceil(text: str) -> None:
    m = measure_sms(text)
    assert m.segments >= math.ceil(m.units / m.per_segment)
    assert (m.segments == 0) == (text == "")
    if m.segments == 1:
        assert m.units <= (160 if m.encoding is SmsEncoding.GSM7 else 70)


@settings(max_examples=200)
@given(sms_texts, sms_texts)
def test_sms_appending_text_never_saves_a_segment(a: str, b: str) -> None:
    assert measure_sms(a + b).segments >= measure_sms(a).segments


# --- Truncation ----------------------------------------------------------------------


def test_truncate_returns_text_that_fits_unchanged() -> None:
    assert truncate("all good", 8) == "all good"
    assert truncate("", 0) == ""


def test_truncate_cuts_at_word_boundary_and_strips_dangling_punctuation() -> None:
    text = "Payments are delayed, we are investigating"
    assert truncate(text, 22) == "Payments are delayed…"
    assert truncate(text, 30) == "Payments are delayed, we are…"
    assert truncate(text, 30, ellipsis="...") == "Payments are delayed, we..."


def test_truncate_cuts_inside_a_word_only_when_the_first_word_does_not_fit() -> None:
    assert truncate("Unavailability everywhere", 6) == "Unava…"


def test_truncate_never_splits_a_grapheme() -> None:
    text = FAMILY * 5
    assert truncate(text, 3) == FAMILY * 2 + "…"
    assert truncate("e\u0301" * 10, 4) == "e\u0301" * 3 + "…"


def test_truncate_below_ellipsis_length_returns_part_of_the_ellipsis() -> None:
    assert truncate("long text here", 2, ellipsis="...") == ".."
    assert truncate("long text here", 0) == ""


def test_truncate_rejects_negative_limit() -> None:
    with pytest.raises(ValueError, match="max_graphemes"):
        truncate("text", -1)


# Mostly multi-codepoint graphemes and spaces, so boundaries are exercised often.
word_texts = st.lists(
    st.sampled_from(["a", "b", "é", "e\u0301", THUMBS_UP_MEDIUM, FLAG_FR, FAMILY, " ", ",", "\n"])
).map("".join)
ellipses = st.sampled_from(["…", "...", "", FAMILY, " [more]"])
STRIPPED = {",", ";", ":", "-", "\u2013", "\u2014"}


def _check_truncation(text: str, limit: int, ellipsis: str) -> str:
    """Assert the properties every truncation has; return the kept prefix."""
    result = truncate(text, limit, ellipsis=ellipsis)
    assert grapheme_count(result) <= limit
    if grapheme_count(text) <= limit:
        assert result == text
        return text
    assert result.endswith(ellipsis)
    prefix = result[: len(result) - len(ellipsis)]
    assert text.startswith(prefix)
    kept = split_graphemes(prefix)
    assert kept == split_graphemes(text)[: len(kept)]
    return prefix


@settings(max_examples=300)
@given(st.text(), st.integers(min_value=0, max_value=40), ellipses)
def test_truncate_properties_on_any_text(text: str, extra: int, ellipsis: str) -> None:
    _check_truncation(text, grapheme_count(ellipsis) + extra, ellipsis)


@settings(max_examples=300)
@given(word_texts, st.integers(min_value=0, max_value=30), ellipses)
def test_truncate_ends_at_word_boundary_when_a_space_is_within_limit(
    text: str, extra: int, ellipsis: str
) -> None:
    limit = grapheme_count(ellipsis) + extra
    prefix = _check_truncation(text, limit, ellipsis)
    graphemes = split_graphemes(text)
    if len(graphemes) <= limit:
        return
    budget = limit - grapheme_count(ellipsis)
    has_word_within_limit = any(
        graphemes[i].isspace() and any(not (g.isspace() or g in STRIPPED) for g in graphemes[:i])
        for i in range(1, budget + 1)
    )
    if has_word_within_limit:
        kept = split_graphemes(prefix)
        following = graphemes[len(kept)]
        assert following.isspace() or following in STRIPPED
        assert not (kept[-1].isspace() or kept[-1] in STRIPPED)


# --- Links ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "links"),
    [
        pytest.param("see https://status.example.com/i/42.", ["https://status.example.com/i/42"]),
        pytest.param("(https://example.com/a), then?", ["https://example.com/a"]),
        pytest.param(
            "https://en.wikipedia.org/wiki/Mercury_(planet)!",
            ["https://en.wikipedia.org/wiki/Mercury_(planet)"],
        ),
        pytest.param("a http://a.io; b HTTPS://B.IO/x?y=1:", ["http://a.io", "HTTPS://B.IO/x?y=1"]),
        pytest.param("ftp://example.com and example.com", []),
        pytest.param("<https://example.com>", ["https://example.com"]),
    ],
)
def test_find_links_excludes_trailing_punctuation(text: str, links: list[str]) -> None:
    assert find_links(text) == links


@pytest.mark.parametrize(
    "text",
    [
        "Details: https://status.example.com/incidents/42?utm=sms#latest.",
        "http://localhost:8080/health",
        "https://[2001:db8::1]:443/",
        "https://192.0.2.1/",
        "https://bücher.example/",
        "no links at all",
    ],
)
def test_link_problems_accepts_good_links(text: str) -> None:
    assert link_problems(text) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "down, see https://exa mple.com now",
            "malformed link 'https://exa mple.com': contains a space",
            id="space",
        ),
        pytest.param(
            "https://{{url}}",
            "malformed link 'https://{{url}}': contains '{', which is not allowed in a link",
            id="template-leftover",
        ),
        pytest.param("see http:// now", "malformed link 'http://': no host", id="no-host"),
        pytest.param(
            "https://example.com:99999",
            "malformed link 'https://example.com:99999': invalid port '99999'",
            id="port-out-of-range",
        ),
        pytest.param(
            "https://intranet/x", "malformed link 'https://intranet/x': host 'intranet' has no dot"
        ),
        pytest.param(
            "https://example..com",
            "malformed link 'https://example..com': host 'example..com' has an empty label",
        ),
    ],
)
def test_link_problems_reports_malformed_links(text: str, message: str) -> None:
    assert link_problems(text) == [message]


def test_grapheme_count_with_links_counts_each_link_as_fixed_length() -> None:
    text = "Down: https://status.example.com/incidents/12345 and https://x.io."
    assert grapheme_count_with_links(text, None) == grapheme_count(text)
    # "Down: " + " and " + "." around two links of 23 each.
    assert grapheme_count_with_links(text, 23) == 6 + 5 + 1 + 2 * 23


@settings(max_examples=100)
@given(st.text())
def test_grapheme_count_with_links_without_links_is_grapheme_count(text: str) -> None:
    if not find_links(text):
        assert grapheme_count_with_links(text, 23) == grapheme_count(text)
