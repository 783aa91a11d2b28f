"""Templates: every shipped variant renders and fits its channels; every failure is a
CheckFailure a person can act on, never a traceback."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from broadcaster.errors import ConfigError, NotFoundError
from broadcaster.models import (
    Capabilities,
    ChannelFamily,
    ChannelLimits,
    ChannelRender,
    CheckFailure,
    ComponentState,
    ComponentStatus,
    Impact,
    IncidentStatus,
    Rendered,
)
from broadcaster.templates import (
    RenderContext,
    TemplateLibrary,
    check_render,
    shipped_templates_folder,
)
from broadcaster.text import grapheme_count, measure_sms

SHIPPED = [
    "holding",
    "identified",
    "investigating",
    "maintenance_cancelled",
    "maintenance_completed",
    "maintenance_scheduled",
    "maintenance_started",
    "monitoring",
    "resolved",
]
LANGUAGES = ["en", "fr"]
STATUS_FOR = {
    "investigating": IncidentStatus.INVESTIGATING,
    "identified": IncidentStatus.IDENTIFIED,
    "monitoring": IncidentStatus.MONITORING,
    "resolved": IncidentStatus.RESOLVED,
    "holding": IncidentStatus.IDENTIFIED,
    "maintenance_scheduled": IncidentStatus.SCHEDULED,
    "maintenance_started": IncidentStatus.IN_PROGRESS,
    "maintenance_completed": IncidentStatus.COMPLETED,
    "maintenance_cancelled": IncidentStatus.COMPLETED,
}
STATUS_PAGE_URL = "https://status.example.com/incidents/1234"  # 40 chars
NEXT_UPDATE_AT = datetime(2026, 11, 26, 14, 30, tzinfo=UTC)
NEXT_UPDATE_PROMISE = {"en": "Next update by 14:30 UTC", "fr": "Prochaine mise à jour à 14:30 UTC"}
COMPONENT_LABEL = {"en": "partial outage", "fr": "panne partielle"}
# Realistic limits per family: Bluesky, Slack, email.
LIMITS = {
    ChannelFamily.SHORT: ChannelLimits(max_graphemes=300),
    ChannelFamily.CHAT: ChannelLimits(max_chars=4000),
    ChannelFamily.LONG: ChannelLimits(max_subject_chars=150),
}
SMS_LIMITS = ChannelLimits(max_sms_segments=3)
EACH = Capabilities(languages="each")
JOINED = Capabilities(languages="joined")


@pytest.fixture(scope="module")
def library() -> TemplateLibrary:
    return TemplateLibrary.with_shipped()


def make_context(
    name: str, fields: dict[str, str] | None = None, **overrides: object
) -> RenderContext:
    values: dict[str, object] = {
        "incident_id": 42,
        "title": "Payments degraded",
        "status": STATUS_FOR.get(name, IncidentStatus.INVESTIGATING),
        "impact": Impact.MAJOR,
        "components": [
            ComponentStatus(
                name="payments", display_name="Payments", state=ComponentState.PARTIAL_OUTAGE
            )
        ],
        "fields": fields if fields is not None else {},
        "next_update_at": NEXT_UPDATE_AT,
        "started_at": datetime(2026, 11, 26, 13, 55, tzinfo=UTC),
        "status_page_url": STATUS_PAGE_URL,
    }
    values.update(overrides)
    return RenderContext.model_validate(values)


def example_context(library: TemplateLibrary, name: str, **overrides: object) -> RenderContext:
    return make_context(name, dict(library.get(name).example), **overrides)


def render_one(
    library: TemplateLibrary,
    name: str,
    family: ChannelFamily,
    language: str,
    context: RenderContext,
    *,
    limits: ChannelLimits | None = None,
    gsm7: bool = False,
) -> tuple[ChannelRender, list[CheckFailure]]:
    return library.render_for_channel(
        name,
        channel=f"{family.value}-test",
        family=family,
        languages=[language],
        limits=limits or LIMITS[family],
        capabilities=EACH,
        context=context,
        gsm7=gsm7,
    )


def user_folder(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


# --- the shipped templates -------------------------------------------------------------


def test_shipped_templates_are_the_update_kinds(library: TemplateLibrary) -> None:
    assert library.names() == SHIPPED
    assert shipped_templates_folder().is_dir()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_template_has_every_variant_and_declares_its_example(
    library: TemplateLibrary, name: str
) -> None:
    spec = library.get(name)
    assert spec.description
    assert set(spec.variants) == {(f, lang) for f in ChannelFamily for lang in LANGUAGES}
    assert library.check_fields(name, spec.example) == []


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("family", list(ChannelFamily))
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_variant_renders_example_within_channel_limits(
    library: TemplateLibrary, name: str, family: ChannelFamily, language: str
) -> None:
    render, failures = render_one(library, name, family, language, example_context(library, name))

    assert failures == []
    text = render.text(language)
    assert NEXT_UPDATE_PROMISE[language] in text
    assert COMPONENT_LABEL[language] in text.lower()
    assert STATUS_PAGE_URL in text
    assert text == text.strip() and "\n\n\n" not in text
    assert "None" not in text
    if family is ChannelFamily.LONG:
        subject = render.subject(language)
        assert subject and "\n" not in subject and "Payments degraded" in subject


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_short_variant_fits_three_sms_segments(
    library: TemplateLibrary, name: str, language: str
) -> None:
    # French SMS channels transliterate to GSM-7: "ê" alone would triple the cost.
    render, failures = render_one(
        library,
        name,
        ChannelFamily.SHORT,
        language,
        example_context(library, name),
        limits=SMS_LIMITS,
        gsm7=language == "fr",
    )

    assert failures == []
    [measure] = render.measures
    assert measure.sms_encoding == "GSM-7"
    assert measure.sms_segments is not None and measure.sms_segments <= 3


@pytest.mark.parametrize("name", ["investigating", "resolved"])
def test_english_first_and_last_messages_fit_one_sms(library: TemplateLibrary, name: str) -> None:
    render, _ = render_one(
        library, name, ChannelFamily.SHORT, "en", example_context(library, name), limits=SMS_LIMITS
    )

    assert render.measures[0].sms_segments == 1


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("family", list(ChannelFamily))
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_variant_renders_with_only_required_fields_and_no_extras(
    library: TemplateLibrary, name: str, family: ChannelFamily, language: str
) -> None:
    spec = library.get(name)
    fields = {k: v for k, v in spec.example.items() if k in spec.required}
    context = make_context(
        name, fields, components=[], next_update_at=None, started_at=None, status_page_url=None
    )

    render, failures = render_one(library, name, family, language, context)

    assert failures == []
    text = render.text(language)
    assert text and "None" not in text and "\n\n\n" not in text
    assert "Next update" not in text and "Prochaine mise à jour" not in text


def test_french_variant_uses_french_field_values_and_labels(library: TemplateLibrary) -> None:
    context = example_context(library, "investigating")

    rendered = library.render("investigating", ChannelFamily.LONG, "fr", context)

    assert "Les paiements échouent pour certains utilisateurs." in rendered.text
    assert "Statut : Enquête en cours · Impact : Majeur" in rendered.text
    assert "- Payments : Panne partielle" in rendered.text
    assert rendered.subject == "Enquête en cours : Payments degraded"


def test_times_are_shown_in_the_incident_timezone(library: TemplateLibrary) -> None:
    context = example_context(library, "maintenance_scheduled", timezone="Europe/Paris")

    en = library.render("maintenance_scheduled", ChannelFamily.LONG, "en", context)
    fr = library.render("maintenance_scheduled", ChannelFamily.LONG, "fr", context)

    assert "Next update by 15:30 CET" in en.text
    assert "28 Nov 2026, 03:00 to 05:00 CET" in en.text
    assert "le 28 nov. 2026, de 03:00 à 05:00 CET" in fr.text


def test_naive_time_field_is_read_in_the_incident_timezone(library: TemplateLibrary) -> None:
    fields = {"starts_at": "2026-07-01 02:00", "ends_at": "2026-07-01 04:00"}
    context = make_context("maintenance_scheduled", fields, timezone="Europe/Paris")

    rendered = library.render("maintenance_scheduled", ChannelFamily.SHORT, "en", context)

    assert "1 Jul 2026, 02:00 to 04:00 CEST" in rendered.text


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("en", "27 Nov 2026 22:00 UTC to 28 Nov 2026 02:00 UTC"),
        ("fr", "du 27 nov. 2026 22:00 UTC au 28 nov. 2026 02:00 UTC"),
    ],
)
def test_maintenance_window_over_midnight_shows_both_dates(
    library: TemplateLibrary, language: str, expected: str
) -> None:
    fields = {"starts_at": "2026-11-27T22:00:00Z", "ends_at": "2026-11-28T02:00:00Z"}
    context = make_context("maintenance_scheduled", fields)

    rendered = library.render("maintenance_scheduled", ChannelFamily.CHAT, language, context)

    assert expected in rendered.text


def test_free_text_time_field_is_shown_as_written(library: TemplateLibrary) -> None:
    context = make_context("identified", {"summary": "Payments fail", "eta": "about an hour"})

    rendered = library.render("identified", ChannelFamily.SHORT, "en", context)

    assert "Fix expected by about an hour." in rendered.text


def test_unknown_timezone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        make_context("investigating", timezone="Mars/Olympus")


# --- field checks ----------------------------------------------------------------------


def test_missing_required_field_names_the_field_and_the_fix(library: TemplateLibrary) -> None:
    failures = library.check_fields("identified", {"eta": "15:00"})

    assert [(f.check, f.message) for f in failures] == [
        ("field", "template 'identified' needs field 'summary' — add --set summary=...")
    ]


def test_blank_required_field_counts_as_missing(library: TemplateLibrary) -> None:
    failures = library.check_fields("investigating", {"summary": "  "})

    assert [f.message for f in failures] == [
        "template 'investigating' needs field 'summary' — add --set summary=..."
    ]


def test_missing_required_field_while_rendering_is_a_failure_not_an_exception(
    library: TemplateLibrary,
) -> None:
    render, failures = render_one(
        library, "identified", ChannelFamily.SHORT, "en", make_context("identified", {})
    )

    assert [f.message for f in failures] == [
        "template 'identified' needs field 'summary' — add --set summary=..."
    ]
    assert failures[0].channel == "short-test"
    assert render.variants == []


def test_unknown_field_is_reported_with_a_suggestion_and_the_known_fields(
    library: TemplateLibrary,
) -> None:
    failures = library.check_fields("identified", {"summary": "x", "workarond": "y"})

    assert [f.message for f in failures] == [
        "template 'identified' does not use field 'workarond' — did you mean 'workaround'? "
        "known fields: eta, summary, workaround"
    ]


def test_language_specific_field_is_known_and_wins_in_its_language(
    library: TemplateLibrary,
) -> None:
    fields = {"summary": "Payments fail", "summary.fr": "Les paiements échouent"}
    assert library.check_fields("investigating", fields) == []

    context = make_context("investigating", fields)
    en = library.render("investigating", ChannelFamily.SHORT, "en", context)
    fr = library.render("investigating", ChannelFamily.SHORT, "fr", context)

    assert "Investigating: Payments fail." in en.text
    assert "Enquête en cours : Les paiements échouent." in fr.text


def test_required_field_given_for_another_language_only_names_the_missing_language(
    library: TemplateLibrary,
) -> None:
    context = make_context("investigating", {"summary.en": "Payments fail"})

    _, failures = render_one(library, "investigating", ChannelFamily.SHORT, "fr", context)

    assert [f.message for f in failures] == [
        "template 'investigating' needs field 'summary' in fr — "
        "add --set summary.fr=... or --set summary=..."
    ]


# --- checks of the rendered text -------------------------------------------------------


def test_field_containing_template_syntax_is_an_unresolved_placeholder(
    library: TemplateLibrary,
) -> None:
    context = make_context("identified", {"summary": "Payments fail", "summary.fr": "{{eta}}"})

    _, failures = library.render_for_channel(
        "identified",
        channel="bluesky-main",
        family=ChannelFamily.SHORT,
        languages=LANGUAGES,
        limits=LIMITS[ChannelFamily.SHORT],
        capabilities=EACH,
        context=context,
    )

    assert [(f.check, str(f)) for f in failures] == [
        (
            "placeholder",
            "bluesky-main: unresolved placeholder '{{eta}}' in the fr text "
            "— a field contains template syntax",
        )
    ]


@pytest.mark.parametrize(
    ("text", "placeholder"),
    [
        ("Fixed by {{ eta }}.", "{{ eta }}"),
        ("Fixed {% if eta %}soon", "{% if eta %}"),
        ("Fixed {# note #} soon", "{# note #}"),
        ("Fixed by ${eta}.", "${eta}"),
        ("Fixed by {eta}.", "{eta}"),
        ("Fixed by {{eta", "{{eta"),
    ],
)
def test_every_placeholder_style_is_caught(text: str, placeholder: str) -> None:
    render = ChannelRender(
        channel="sms",
        family=ChannelFamily.SHORT,
        template="identified",
        variants=[Rendered(language="en", text=text)],
        joined=False,
    )

    failures = check_render(render, ChannelLimits())

    assert [f.message for f in failures] == [
        f"unresolved placeholder '{placeholder}' in the en text — a field contains template syntax"
    ]


def test_braces_that_are_not_placeholders_pass() -> None:
    render = ChannelRender(
        channel="slack",
        family=ChannelFamily.CHAT,
        template="identified",
        variants=[Rendered(language="en", text="Error {} in {1, 2} costs 5 € — see $HOME")],
        joined=False,
    )

    assert check_render(render, ChannelLimits()) == []


def test_text_over_grapheme_limit_names_measure_limit_and_fix() -> None:
    # 318 user-perceived characters but 612 code points: graphemes are what Bluesky counts.
    text = "e\u0301" * 294 + " https://x.co/abcdefghij"
    assert grapheme_count(text) == 318
    render = ChannelRender(
        channel="bluesky-main",
        family=ChannelFamily.SHORT,
        template="investigating",
        variants=[Rendered(language="en", text=text)],
        joined=True,
    )

    [failure] = check_render(render, ChannelLimits(max_graphemes=300))

    assert failure.check == "graphemes"
    assert (failure.measure, failure.limit) == (318, 300)
    assert str(failure) == (
        "bluesky-main: update is 318 graphemes, limit 300 — shorten the summary or drop the link"
    )


def test_links_count_at_fixed_length_where_the_channel_says_so() -> None:
    text = "Payments fail. " + "https://status.example.com/" + "x" * 300
    render = ChannelRender(
        channel="x-main",
        family=ChannelFamily.SHORT,
        template="investigating",
        variants=[Rendered(language="en", text=text)],
        joined=True,
    )

    assert check_render(render, ChannelLimits(max_graphemes=280, link_length=23)) == []
    assert check_render(render, ChannelLimits(max_graphemes=280))[0].measure == len(text)


def test_chars_and_subject_limits(library: TemplateLibrary) -> None:
    context = example_context(library, "investigating", title="Payments degraded " * 10)

    _, failures = render_one(
        library,
        "investigating",
        ChannelFamily.LONG,
        "en",
        context,
        limits=ChannelLimits(max_chars=200, max_subject_chars=150),
    )

    assert [f.check for f in failures] == ["chars", "subject"]
    subject = failures[1]
    assert subject.limit == 150 and subject.measure is not None and subject.measure > 150
    assert subject.message.endswith("limit 150 — shorten the title")


def test_sms_over_budget_and_gsm7_transliteration_saves_segments(
    library: TemplateLibrary,
) -> None:
    context = example_context(library, "investigating")
    limits = ChannelLimits(max_sms_segments=2)

    ucs2, failures = render_one(
        library, "investigating", ChannelFamily.SHORT, "fr", context, limits=limits
    )
    gsm, gsm_failures = render_one(
        library, "investigating", ChannelFamily.SHORT, "fr", context, limits=limits, gsm7=True
    )

    [before], [after] = ucs2.measures, gsm.measures
    assert (before.sms_encoding, after.sms_encoding) == ("UCS-2", "GSM-7")
    assert after.sms_segments is not None and before.sms_segments is not None
    assert after.sms_segments < before.sms_segments
    [failure] = failures
    assert failure.check == "sms_segments"
    assert (failure.measure, failure.limit) == (before.sms_segments, 2)
    assert "send it as GSM-7" in failure.message
    assert gsm_failures == []
    assert "Enquete en cours" in gsm.text("fr")
    assert measure_sms(gsm.text("fr")).encoding == "GSM-7"


def test_malformed_status_page_url_is_a_link_failure(library: TemplateLibrary) -> None:
    context = example_context(
        library, "investigating", status_page_url="https://status example.com/incidents/1"
    )

    _, failures = render_one(library, "investigating", ChannelFamily.SHORT, "en", context)

    assert [(f.check, f.message) for f in failures] == [
        (
            "link",
            "malformed link 'https://status example.com/incidents/1': contains a space "
            "in the en text — fix the field or the URL",
        )
    ]


def test_status_page_url_without_scheme_is_not_a_link(library: TemplateLibrary) -> None:
    context = example_context(library, "investigating", status_page_url="status.example.com")

    _, failures = render_one(library, "investigating", ChannelFamily.SHORT, "en", context)

    assert [f.message for f in failures] == [
        "status_page_url 'status.example.com' is not a link — it must start with https://"
    ]


def test_joined_bilingual_render_measures_the_joined_text(library: TemplateLibrary) -> None:
    render, failures = library.render_for_channel(
        "investigating",
        channel="bluesky-main",
        family=ChannelFamily.SHORT,
        languages=LANGUAGES,
        limits=ChannelLimits(max_graphemes=300, max_sms_segments=10),
        capabilities=JOINED,
        context=example_context(library, "investigating"),
    )

    assert render.joined
    [measure] = render.measures
    assert measure.language == "en+fr"
    assert measure.graphemes == grapheme_count(render.text()) > 300
    assert render.text().startswith(render.text("en") + "\n\n" + render.text("fr"))
    assert measure.sms_segments == measure_sms(render.text()).segments
    [failure] = failures
    assert failure.check == "graphemes" and failure.measure == measure.graphemes
    assert "update (en+fr) is" in failure.message
    assert "send one message per language" in failure.message


def test_each_language_render_measures_each_text(library: TemplateLibrary) -> None:
    render, failures = library.render_for_channel(
        "investigating",
        channel="email",
        family=ChannelFamily.LONG,
        languages=LANGUAGES,
        limits=LIMITS[ChannelFamily.LONG],
        capabilities=EACH,
        context=example_context(library, "investigating"),
    )

    assert failures == []
    assert [m.language for m in render.measures] == LANGUAGES
    assert all(m.sms_segments is None for m in render.measures)


# --- folders: overrides, additions, unknowns -------------------------------------------


def test_user_folder_overrides_one_variant_and_the_rest_stays_shipped(tmp_path: Path) -> None:
    folder = user_folder(
        tmp_path, {"investigating/short.fr.j2": "Panne en cours : {{ summary|sentence }}"}
    )
    library = TemplateLibrary.with_shipped(folder)
    context = example_context(library, "investigating")

    fr = library.render("investigating", ChannelFamily.SHORT, "fr", context)
    en = library.render("investigating", ChannelFamily.SHORT, "en", context)
    long_fr = library.render("investigating", ChannelFamily.LONG, "fr", context)

    spec = library.get("investigating")
    assert fr.text == "Panne en cours : Les paiements échouent pour certains utilisateurs."
    assert en.text.startswith("Investigating: Payments fail for some users.")
    assert long_fr.text.startswith("Payments degraded\nStatut : Enquête en cours")
    assert spec.variants[(ChannelFamily.SHORT, "fr")] == folder / "investigating/short.fr.j2"
    assert spec.variants[(ChannelFamily.SHORT, "en")].is_relative_to(shipped_templates_folder())
    assert spec.folder == shipped_templates_folder() / "investigating"
    assert spec.required == ["summary"]


def test_user_folder_adds_a_template_that_uses_the_shipped_macros(tmp_path: Path) -> None:
    folder = user_folder(
        tmp_path,
        {
            "postmortem/template.toml": (
                'description = "Link to the postmortem"\nrequired = ["url"]\n'
                '[example]\nurl = "https://blog.example.com/postmortem"\n'
            ),
            "postmortem/short.en.j2": (
                '{% import "_macros/en.j2" as m with context %}'
                '{{ m.words("Postmortem for " ~ title ~ ": " ~ url, m.next_update()) }}'
            ),
        },
    )
    library = TemplateLibrary.with_shipped(folder)

    rendered = library.render(
        "postmortem",
        ChannelFamily.SHORT,
        "en",
        make_context("postmortem", dict(library.get("postmortem").example)),
    )

    assert library.names() == sorted([*SHIPPED, "postmortem"])
    assert rendered.text == (
        "Postmortem for Payments degraded: https://blog.example.com/postmortem "
        "Next update by 14:30 UTC."
    )


def test_user_labels_override_single_labels(tmp_path: Path) -> None:
    folder = user_folder(
        tmp_path, {"_labels/fr.toml": '[component_state]\npartial_outage = "Service perturbé"\n'}
    )
    library = TemplateLibrary.with_shipped(folder)
    context = example_context(library, "investigating")

    rendered = library.render("investigating", ChannelFamily.LONG, "fr", context)

    assert "- Payments : Service perturbé" in rendered.text
    assert "Statut : Enquête en cours" in rendered.text  # the other labels stay shipped


def test_language_without_labels_falls_back_to_english_labels(tmp_path: Path) -> None:
    folder = user_folder(
        tmp_path, {"investigating/chat.de.j2": "{{ status|label }}: {{ summary }}"}
    )
    library = TemplateLibrary.with_shipped(folder)

    rendered = library.render(
        "investigating",
        ChannelFamily.CHAT,
        "de",
        make_context("investigating", {"summary": "Zahlungen schlagen fehl"}),
    )

    assert rendered.text == "Investigating: Zahlungen schlagen fehl"


def test_unknown_template_lists_the_known_ones(library: TemplateLibrary) -> None:
    with pytest.raises(NotFoundError) as caught:
        library.get("investigatin")

    assert str(caught.value) == "unknown template 'investigatin' — known: " + ", ".join(SHIPPED)
    _, failures = render_one(
        library, "investigatin", ChannelFamily.SHORT, "en", make_context("x", {})
    )
    assert [f.message for f in failures] == [str(caught.value)]


def test_missing_language_variant_is_a_failure_naming_the_file_to_add(
    library: TemplateLibrary,
) -> None:
    _, failures = render_one(
        library,
        "investigating",
        ChannelFamily.SHORT,
        "de",
        example_context(library, "investigating"),
    )

    assert [f.message for f in failures] == [
        "template 'investigating' has no short variant in 'de' (has: en, fr) "
        "— add investigating/short.de.j2 to your templates folder"
    ]


def test_missing_templates_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TemplateLibrary.with_shipped(tmp_path / "nope")


def test_broken_template_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    folder = user_folder(tmp_path, {"oops/template.toml": 'required = "summary"\n'})

    with pytest.raises(ConfigError, match=r"oops/template\.toml: required"):
        TemplateLibrary.with_shipped(folder)


# --- user templates that go wrong ------------------------------------------------------


def render_user_template(tmp_path: Path, source: str) -> list[CheckFailure]:
    folder = user_folder(
        tmp_path,
        {"custom/template.toml": 'required = ["summary"]\n', "custom/short.en.j2": source},
    )
    library = TemplateLibrary.with_shipped(folder)
    _, failures = render_one(
        library,
        "custom",
        ChannelFamily.SHORT,
        "en",
        make_context("custom", {"summary": "Payments fail"}),
    )
    return failures


def test_undeclared_variable_is_a_failure_naming_it(tmp_path: Path) -> None:
    failures = render_user_template(tmp_path, "{{ summary }} by {{ eta }}")

    assert [(f.check, f.message) for f in failures] == [
        (
            "field",
            "template 'custom' (short.en.j2) uses 'eta', which is neither a field it declares "
            "nor a template variable — add it to optional in custom/template.toml "
            "or fix the name",
        )
    ]


def test_sandbox_refuses_python_internals_as_a_failure(tmp_path: Path) -> None:
    failures = render_user_template(tmp_path, "{{ ''.__class__.__mro__ }}")

    [failure] = failures
    assert failure.check == "render"
    assert "sandbox forbids" in failure.message and "__class__" in failure.message


def test_sandbox_refuses_huge_repetition(tmp_path: Path) -> None:
    failures = render_user_template(tmp_path, "{{ 'x' * 10**9 }}")

    assert [f.check for f in failures] == ["render"]
    assert "repetition too large" in failures[0].message


def test_sandbox_refuses_mutation(tmp_path: Path) -> None:
    failures = render_user_template(tmp_path, "{% set l = [] %}{{ l.append(1) }}{{ summary }}")

    assert [f.check for f in failures] == ["render"]


def test_syntax_error_is_a_failure_with_file_and_line(tmp_path: Path) -> None:
    failures = render_user_template(tmp_path, "{{ summary }}\n{% if %}")

    [failure] = failures
    assert failure.message.startswith(
        "template 'custom' has a syntax error in custom/short.en.j2 line 2:"
    )


def test_runtime_error_in_a_template_is_a_failure(tmp_path: Path) -> None:
    failures = render_user_template(tmp_path, "{{ summary }} {{ 1 // 0 }}")

    assert [f.check for f in failures] == ["render"]
    assert "ZeroDivisionError" in failures[0].message


def test_import_of_missing_macros_is_a_failure(tmp_path: Path) -> None:
    failures = render_user_template(tmp_path, '{% import "_macros/xx.j2" as m %}{{ summary }}')

    assert [f.message for f in failures] == [
        "template 'custom' (short.en.j2) uses '_macros/xx.j2', which no templates folder has"
    ]


def test_macros_imported_without_context_fail_instead_of_using_english(tmp_path: Path) -> None:
    failures = render_user_template(
        tmp_path, '{% import "_macros/fr.j2" as m %}{{ summary }} {{ m.status_line() }}'
    )

    assert [f.check for f in failures] == ["render"]
    assert "with context" in failures[0].message
