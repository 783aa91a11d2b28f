"""Templates: loading them from folders, rendering them in a sandbox, checking the result.

A template is the words for one kind of update (`investigating`, `resolved`...): a
folder holding `template.toml` (description, required and optional fields, example
values) and one Jinja2 file per channel family and language (`short.en.j2`,
`long.fr.j2`...). A library stacks several folders, the first one winning per
template *and* per file, so a user folder may override a single variant of a shipped
template, add a template, or override a few labels.

Rendering never raises into the core's publishing path: `render_for_channel` turns
every problem (a missing field, a template bug, the sandbox refusing something) into
a `CheckFailure` a person can act on, next to the checks of the text itself
(`check_render`: leftover placeholders, each channel's limits, malformed links).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broadcaster.errors import BroadcasterError, ConfigError, NotFoundError
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
    Measure,
    Rendered,
    TimeZoneName,
)
from broadcaster.text import (
    SmsEncoding,
    find_links,
    grapheme_count_with_links,
    link_problems,
    measure_sms,
    to_gsm7,
)

__all__ = [
    "RenderContext",
    "RenderError",
    "TemplateLibrary",
    "TemplateSpec",
    "check_render",
    "measure_render",
    "shipped_templates_folder",
]

# `short.en.j2`, `long.pt-BR.j2`: family, then a BCP 47-ish language tag.
_LANGUAGE = r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*"
_VARIANT_FILE = re.compile(rf"^(?P<family>short|chat|long)\.(?P<language>{_LANGUAGE})\.j2$")
# A field given for one language only: `summary.fr` is `summary` in the French text.
_LANGUAGE_FIELD = re.compile(rf"^(?P<field>.+)\.(?P<language>{_LANGUAGE})$")

_FALLBACK_LANGUAGE = "en"
_ENGLISH_MONTHS = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
]  # fmt: skip
_LABEL_TABLES: dict[type[Enum], str] = {
    IncidentStatus: "status",
    Impact: "impact",
    ComponentState: "component_state",
}


def shipped_templates_folder() -> Path:
    """The templates that ship with the tool: packaged in the wheel, or the repo's folder."""
    package = Path(__file__).parent
    packaged = package / "shipped_templates"
    return packaged if packaged.is_dir() else package.parent / "templates"


class RenderError(BroadcasterError):
    """One variant could not be rendered; `check` is the CheckFailure kind it becomes."""

    def __init__(self, message: str, *, check: str = "render") -> None:
        super().__init__(message)
        self.check = check


class RenderContext(BaseModel):
    """What templates see besides the user's fields."""

    incident_id: int | None = None
    title: str
    status: IncidentStatus
    impact: Impact
    components: list[ComponentStatus] = Field(default_factory=list)
    fields: dict[str, str] = Field(default_factory=dict)
    next_update_at: datetime | None = Field(default=None, description="timezone-aware")
    started_at: datetime | None = None
    timezone: TimeZoneName = Field(default="UTC", description="times are shown in it")
    status_page_url: str | None = None


class TemplateSpec(BaseModel):
    """One template as the library resolved it across its folders."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    required: list[str]
    optional: list[str]
    example: dict[str, str] = Field(description="sample values; `summary.fr` is French-only")
    folder: Path = Field(description="the folder whose template.toml won")
    variants: dict[tuple[ChannelFamily, str], Path] = Field(
        description="(family, language) -> the file that wins for it"
    )

    @property
    def fields(self) -> list[str]:
        """Every field the template uses, required first."""
        return [*self.required, *(f for f in self.optional if f not in self.required)]

    def languages(self, family: ChannelFamily) -> list[str]:
        return sorted(language for fam, language in self.variants if fam == family)


class _TemplateFile(BaseModel):
    """The schema of template.toml."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    required: list[str] = Field(default_factory=list)
    optional: list[str] = Field(default_factory=list)
    example: dict[str, str | dict[str, str]] = Field(default_factory=dict)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, also refusing arithmetic that would exhaust memory or CPU."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 100:
            raise SecurityError("exponent too large for a message template")
        if operator == "*":
            sizes = [len(x) for x in (left, right) if isinstance(x, str | list | tuple)]
            counts = [x for x in (left, right) if isinstance(x, int)]
            if sizes and counts and sizes[0] * counts[0] > 100_000:
                raise SecurityError("repetition too large for a message template")
        return super().call_binop(context, operator, left, right)


class TemplateLibrary:
    """The templates of several folders, the first folder winning per template and per file."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = [Path(f) for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise ConfigError(f"templates folder '{folder}' does not exist")
        self._specs = _scan_templates(self.folders)
        self._labels = _load_labels(self.folders)
        self._env = _Sandbox(
            loader=jinja2.FileSystemLoader([str(f) for f in self.folders]),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # plain text; each adapter escapes for its own markup
            trim_blocks=True,
            lstrip_blocks=True,
            # An unset optional field prints as nothing, not "None".
            finalize=lambda value: "" if value is None else value,
        )
        self._env.filters.update(
            time=self._time_filter,
            datetime=self._datetime_filter,
            date=self._date_filter,
            label=self._label_filter,
            sentence=_sentence,
            by_state=_by_state,
        )

    @classmethod
    def with_shipped(cls, user_folder: Path | None = None) -> TemplateLibrary:
        """The shipped templates, overridden by user_folder's where it has some."""
        folders = [user_folder] if user_folder is not None else []
        return cls([*folders, shipped_templates_folder()])

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> TemplateSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise NotFoundError(f"unknown template '{name}' — known: {known}") from None

    # --- rendering ---------------------------------------------------------------------

    def render(
        self, name: str, family: ChannelFamily, language: str, context: RenderContext
    ) -> Rendered:
        """One variant's text (and subject, for templates that set one).

        Raises NotFoundError for an unknown template and RenderError for anything
        else that keeps the variant from rendering.
        """
        spec = self.get(name)
        family = ChannelFamily(family)
        file = f"{family.value}.{language}.j2"
        if (family, language) not in spec.variants:
            have = ", ".join(spec.languages(family)) or "none"
            raise RenderError(
                f"template '{name}' has no {family.value} variant in '{language}' "
                f"(has: {have}) — add {name}/{file} to your templates folder"
            )
        variables = self._variables(spec, language, context)
        try:
            template = self._env.get_template(f"{name}/{file}")
            module = template.make_module(variables)
            text = str(module)
            subject = getattr(module, "subject", None)
        except RenderError as exc:
            raise RenderError(f"template '{name}' ({file}): {exc}") from exc
        except jinja2.UndefinedError as exc:
            raise RenderError(
                _undefined_message(spec, file, language, context.fields, exc), check="field"
            ) from exc
        except SecurityError as exc:
            raise RenderError(
                f"template '{name}' ({file}) did something the sandbox forbids: {exc}"
            ) from exc
        except jinja2.TemplateSyntaxError as exc:
            where = exc.name or f"{name}/{file}"
            raise RenderError(
                f"template '{name}' has a syntax error in {where} line {exc.lineno}: {exc.message}"
            ) from exc
        except jinja2.TemplateNotFound as exc:
            raise RenderError(
                f"template '{name}' ({file}) uses '{exc.name}', which no templates folder has"
            ) from exc
        except Exception as exc:  # a user's template must not crash publishing
            raise RenderError(
                f"template '{name}' ({file}) failed to render: {type(exc).__name__}: {exc}"
            ) from exc
        # A subject is one line, however the template wrapped it.
        subject_line = " ".join(str(subject).split()) if subject is not None else ""
        return Rendered(language=language, text=_tidy_text(text), subject=subject_line or None)

    def render_for_channel(
        self,
        name: str,
        *,
        channel: str,
        family: ChannelFamily,
        languages: list[str],
        limits: ChannelLimits,
        capabilities: Capabilities,
        context: RenderContext,
        gsm7: bool = False,
    ) -> tuple[ChannelRender, list[CheckFailure]]:
        """Every language of one channel, measured and checked; problems are returned.

        Field checks (check_fields) are the caller's, once per update; a required field
        that is missing still shows up here as a render failure naming it.
        """
        joined = capabilities.languages == "joined"
        variants: list[Rendered] = []
        failures: list[CheckFailure] = []

        def fail(check: str, message: str) -> None:
            if all(f.message != message for f in failures):
                failures.append(CheckFailure(channel=channel, check=check, message=message))

        if not languages:
            fail("render", "no language configured for this channel — set its languages")
        for language in languages:
            try:
                rendered = self.render(name, family, language, context)
            except NotFoundError as exc:
                fail("render", str(exc))
                break
            except RenderError as exc:
                fail(exc.check, str(exc))
                continue
            if gsm7:
                rendered = rendered.model_copy(update={"text": to_gsm7(rendered.text)})
            variants.append(rendered)

        render = ChannelRender(
            channel=channel,
            family=family,
            template=name,
            variants=variants,
            joined=joined,
        )
        render.measures = measure_render(render, limits)
        if failures:
            # What did render is incomplete; its sizes would only mislead.
            return render, failures
        failures.extend(check_render(render, limits))
        if all(f.check != "link" for f in failures):  # else the text check said it already
            for message in _status_page_url_problems(context.status_page_url):
                fail("link", message)
        return render, failures

    def check_fields(self, name: str, fields: Mapping[str, str]) -> list[CheckFailure]:
        """Required fields present, and no field the template does not use (typos)."""
        spec = self.get(name)
        known = spec.fields
        failures: list[CheckFailure] = []
        given = {key for key, value in fields.items() if value is not None and str(value).strip()}
        for field in spec.required:
            has_base = field in given
            has_language = any(_base_field(key) == field for key in given)
            if not (has_base or has_language):
                failures.append(
                    CheckFailure(
                        channel=None,
                        check="field",
                        message=f"template '{name}' needs field '{field}' — add --set {field}=...",
                    )
                )
        for key in fields:
            if _base_field(key) in known:
                continue
            close = difflib.get_close_matches(_base_field(key), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            listing = ", ".join(sorted(known)) or "none"
            failures.append(
                CheckFailure(
                    channel=None,
                    check="field",
                    message=f"template '{name}' does not use field '{key}' — "
                    f"{hint}known fields: {listing}",
                )
            )
        return failures

    # --- what templates see ------------------------------------------------------------

    def _variables(
        self, spec: TemplateSpec, language: str, context: RenderContext
    ) -> dict[str, Any]:
        fields = _fields_for_language(context.fields, language)
        variables: dict[str, Any] = dict.fromkeys(spec.optional)
        variables.update(fields)
        for field in spec.required:
            if field not in fields:
                # Left undefined so that using it fails with the field's name.
                variables.pop(field, None)
        variables.update(
            title=context.title,
            status=context.status,
            impact=context.impact,
            kind=spec.name,
            components=list(context.components),
            started_at=context.started_at,
            next_update_at=context.next_update_at,
            status_page_url=context.status_page_url,
            incident_id=context.incident_id,
            language=language,
            timezone=context.timezone,
            fields=fields,
        )
        return variables

    def label(self, value: Any, language: str, table: str | None = None) -> str:
        """The localized label of a status, impact or component state.

        Falls back from `fr-CA` to `fr`, then to English, then to the raw value.
        """
        if isinstance(value, ComponentStatus):
            value = value.state
        if table is not None:
            tables = [table]
        elif isinstance(value, Enum):
            tables = [_LABEL_TABLES.get(type(value), "")]
        else:
            tables = ["status", "component_state", "impact"]
        key = str(value.value) if isinstance(value, Enum) else str(value)
        for lang in _language_chain(language, fallback=True):
            labels = self._labels.get(lang, {})
            for name in tables:
                found = labels.get(name, {})
                if isinstance(found, dict) and isinstance(found.get(key), str):
                    return str(found[key])
        return key

    def _month(self, month: int, language: str) -> str:
        for lang in _language_chain(language, fallback=False):
            months = self._labels.get(lang, {}).get("months")
            if isinstance(months, list) and len(months) == 12:
                return str(months[month - 1])
        return _ENGLISH_MONTHS[month - 1]

    @jinja2.pass_context
    def _label_filter(self, context: Context, value: Any, table: str | None = None) -> str:
        return self.label(value, _from_context(context, "language"), table)

    @jinja2.pass_context
    def _time_filter(self, context: Context, value: Any, zone: bool = True) -> str:
        """14:30 UTC, in the incident's timezone (14:30 with zone=false)."""
        moment = _as_datetime(value, context)
        if moment is None:
            return "" if value is None else str(value)
        return f"{moment:%H:%M} {_zone_abbreviation(moment)}" if zone else f"{moment:%H:%M}"

    @jinja2.pass_context
    def _date_filter(self, context: Context, value: Any) -> str:
        """26 Nov 2026 (month names from the language's labels)."""
        moment = _as_datetime(value, context)
        if moment is None:
            return "" if value is None else str(value)
        language = _from_context(context, "language")
        return f"{moment.day} {self._month(moment.month, language)} {moment.year}"

    @jinja2.pass_context
    def _datetime_filter(self, context: Context, value: Any) -> str:
        """26 Nov 2026 14:30 UTC."""
        moment = _as_datetime(value, context)
        if moment is None:
            return "" if value is None else str(value)
        return f"{self._date_filter(context, moment)} {self._time_filter(context, moment)}"


# --- checks ------------------------------------------------------------------------------

# What a template engine (ours or another) leaves behind when a value was not filled in:
# `{{ eta }}`, `{% if %}`, `{# #}`, `${eta}`, `{eta}`.
_PLACEHOLDER = re.compile(
    r"\{\{[^\n]*?\}\}|\{%[^\n]*?%\}|\{#[^\n]*?#\}"  # closed: {{ eta }}, {% if %}, {# #}
    r"|\{[{%#]\s*[^\s{}%#]*"  # left open: "{{ eta", "{%"
    r"|\$\{[^}\s]*\}?"  # ${eta}
    r"|\{\s*[A-Za-z_][\w.]*\s*\}"  # {eta}, Python str.format style
)


def _placeholders(text: str) -> list[str]:
    found: list[str] = []
    for match in _PLACEHOLDER.finditer(text):
        placeholder = match.group(0)
        if len(placeholder) > 40:
            placeholder = placeholder[:39] + "…"
        if placeholder not in found:
            found.append(placeholder)
    return found


def _sent_texts(render: ChannelRender) -> list[tuple[str, str]]:
    """(language, text) of each message the channel sends: one when languages are joined."""
    if render.joined and render.variants:
        return [("+".join(v.language for v in render.variants), render.text())]
    return [(v.language, v.text) for v in render.variants]


def _sent_subjects(render: ChannelRender) -> list[tuple[str, str]]:
    if render.joined:
        subject = render.subject()
        languages = "+".join(v.language for v in render.variants if v.subject)
        return [(languages, subject)] if subject else []
    return [(v.language, v.subject) for v in render.variants if v.subject]


def measure_render(render: ChannelRender, limits: ChannelLimits) -> list[Measure]:
    """How each message the channel sends measures, the way its provider counts."""
    measures: list[Measure] = []
    for language, text in _sent_texts(render):
        measure = Measure(
            language=language,
            graphemes=grapheme_count_with_links(text, limits.link_length),
            chars=len(text),
        )
        if limits.max_sms_segments is not None:
            sms = measure_sms(text)
            measure.sms_segments = sms.segments
            measure.sms_encoding = str(sms.encoding)
        measures.append(measure)
    return measures


def check_render(render: ChannelRender, limits: ChannelLimits) -> list[CheckFailure]:
    """The checks of the text itself: leftover placeholders, the channel's limits, links."""
    channel = render.channel
    failures: list[CheckFailure] = []

    def fail(
        check: str, message: str, measure: int | None = None, limit: int | None = None
    ) -> None:
        failures.append(
            CheckFailure(
                channel=channel, check=check, message=message, measure=measure, limit=limit
            )
        )

    # The same leftover in several languages is one problem to fix, said once.
    found: dict[tuple[str, str, str], list[str]] = {}
    for variant in render.variants:
        for part, text in (("text", variant.text), ("subject", variant.subject or "")):
            for placeholder in _placeholders(text):
                found.setdefault(("placeholder", placeholder, part), []).append(variant.language)
        for problem in link_problems(variant.text):
            found.setdefault(("link", problem, "text"), []).append(variant.language)
    for (check, what, part), languages in found.items():
        where = _in_languages(languages, part)
        if check == "placeholder":
            fail(
                "placeholder",
                f"unresolved placeholder '{what}' in {where} — a field contains template syntax",
            )
        else:
            fail("link", f"{what} in {where} — fix the field or the URL")

    sent = _sent_texts(render)
    for language, text in sent:
        who = "update" if len(sent) == 1 and "+" not in language else f"update ({language})"
        fixes = ["shorten the summary"]
        if "+" in language:
            fixes.append("send one message per language")
        if find_links(text):
            fixes.append("drop the link")
        fix = _or_list(fixes)
        if limits.max_graphemes is not None:
            count = grapheme_count_with_links(text, limits.link_length)
            if count > limits.max_graphemes:
                fail(
                    "graphemes",
                    f"{who} is {count} graphemes, limit {limits.max_graphemes} — {fix}",
                    count,
                    limits.max_graphemes,
                )
        if limits.max_chars is not None and len(text) > limits.max_chars:
            fail(
                "chars",
                f"{who} is {len(text)} chars, limit {limits.max_chars} — {fix}",
                len(text),
                limits.max_chars,
            )
        if limits.max_sms_segments is not None:
            sms = measure_sms(text)
            if sms.segments > limits.max_sms_segments:
                sms_fixes = fixes
                if sms.encoding is SmsEncoding.UCS2:
                    sms_fixes = [*fixes, "send it as GSM-7 (accents transliterated)"]
                sms_fix = _or_list(sms_fixes)
                fail(
                    "sms_segments",
                    f"{who} is {sms.segments} SMS segments ({sms.encoding}, {sms.units} units), "
                    f"limit {limits.max_sms_segments} — {sms_fix}",
                    sms.segments,
                    limits.max_sms_segments,
                )
    if limits.max_subject_chars is not None:
        for language, subject in _sent_subjects(render):
            if len(subject) > limits.max_subject_chars:
                fail(
                    "subject",
                    f"subject ({language}) is {len(subject)} chars, "
                    f"limit {limits.max_subject_chars} — shorten the title",
                    len(subject),
                    limits.max_subject_chars,
                )
    return failures


def _in_languages(languages: list[str], part: str) -> str:
    """ "the fr text", "the en and fr texts"."""
    return f"the {_and_list(languages)} {part}" + ("s" if len(languages) > 1 else "")


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _status_page_url_problems(url: str | None) -> list[str]:
    """Problems of the status page URL itself, even where no template shows it."""
    if url is None:
        return []
    if re.match(r"^https?://", url.strip(), re.IGNORECASE) is None:
        return [f"status_page_url '{url}' is not a link — it must start with https://"]
    return [f"status_page_url: {problem}" for problem in link_problems(url.strip())]


# --- loading -----------------------------------------------------------------------------


def _scan_templates(folders: Sequence[Path]) -> dict[str, TemplateSpec]:
    """Resolve every template across folders; earlier folders win per template and file."""
    toml_files: dict[str, Path] = {}
    variants: dict[str, dict[tuple[ChannelFamily, str], Path]] = {}
    for folder in reversed(folders):
        for sub in sorted(folder.iterdir()):
            if not sub.is_dir() or sub.name.startswith(("_", ".")):
                continue
            if (sub / "template.toml").is_file():
                toml_files[sub.name] = sub / "template.toml"
            for file in sorted(sub.glob("*.j2")):
                match = _VARIANT_FILE.match(file.name)
                if match is not None:
                    key = (ChannelFamily(match["family"]), match["language"])
                    variants.setdefault(sub.name, {})[key] = file
    specs: dict[str, TemplateSpec] = {}
    for name, toml_file in toml_files.items():
        declared = _read_template_file(toml_file)
        specs[name] = TemplateSpec(
            name=name,
            description=declared.description,
            required=declared.required,
            optional=declared.optional,
            example=_flatten_example(declared.example),
            folder=toml_file.parent,
            variants=dict(sorted(variants.get(name, {}).items())),
        )
    return specs


def _read_template_file(path: Path) -> _TemplateFile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return _TemplateFile.model_validate(data)
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc


def _flatten_example(example: Mapping[str, str | dict[str, str]]) -> dict[str, str]:
    """`[example.fr] summary = ...` becomes `summary.fr`, the form users pass with --set."""
    flat: dict[str, str] = {}
    for key, value in example.items():
        if isinstance(value, dict):
            flat.update({f"{field}.{key}": text for field, text in value.items()})
        else:
            flat[key] = value
    return flat


def _load_labels(folders: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """`_labels/<language>.toml` of every folder, merged per key, earlier folders winning."""
    labels: dict[str, dict[str, Any]] = {}
    for folder in reversed(folders):
        for file in sorted((folder / "_labels").glob("*.toml")):
            try:
                data = tomllib.loads(file.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, OSError) as exc:
                raise ConfigError(f"{file}: {exc}") from exc
            merged = labels.setdefault(file.stem, {})
            for key, value in data.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
    return labels


# --- small pieces ------------------------------------------------------------------------


def _language_chain(language: str, *, fallback: bool) -> list[str]:
    """`fr-CA` -> [fr-CA, fr] (+ en when falling back)."""
    chain = [language]
    base = re.split(r"[-_]", language)[0]
    if base != language:
        chain.append(base)
    if fallback and _FALLBACK_LANGUAGE not in chain:
        chain.append(_FALLBACK_LANGUAGE)
    return chain


def _base_field(key: str) -> str:
    match = _LANGUAGE_FIELD.match(key)
    return match["field"] if match else key


def _fields_for_language(fields: Mapping[str, str], language: str) -> dict[str, str]:
    """The user's fields as one language's text sees them: `summary.fr` wins over `summary`."""
    resolved = {k: v for k, v in fields.items() if _LANGUAGE_FIELD.match(k) is None}
    for lang in reversed(_language_chain(language, fallback=False)):
        suffix = f".{lang}"
        for key, value in fields.items():
            if key.endswith(suffix):
                resolved[key.removesuffix(suffix)] = value
    return {k: v for k, v in resolved.items() if v is not None and v.strip()}


def _undefined_message(
    spec: TemplateSpec, file: str, language: str, given: Mapping[str, str], exc: Exception
) -> str:
    match = re.match(r"^'([^']+)' is undefined$", str(exc))
    if match is None:
        return f"template '{spec.name}' ({file}) uses something undefined: {exc}"
    name = match[1]
    if name in spec.required:
        if any(_base_field(key) == name for key in given):
            return (
                f"template '{spec.name}' needs field '{name}' in {language} — "
                f"add --set {name}.{language}=... or --set {name}=..."
            )
        return f"template '{spec.name}' needs field '{name}' — add --set {name}=..."
    return (
        f"template '{spec.name}' ({file}) uses '{name}', which is neither a field it declares "
        f"nor a template variable — add it to optional in {spec.name}/template.toml "
        "or fix the name"
    )


def _tidy_text(text: str) -> str:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def _sentence(value: Any) -> str:
    """End a field's text with a full stop unless it already ends a sentence."""
    text = "" if value is None else str(value).strip()
    if not text or text[-1] in ".!?…":
        return text
    return text + "."


# Worst first: what a reader must learn first when a post lists several components.
_STATE_ORDER = [
    ComponentState.MAJOR_OUTAGE,
    ComponentState.PARTIAL_OUTAGE,
    ComponentState.DEGRADED_PERFORMANCE,
    ComponentState.UNDER_MAINTENANCE,
    ComponentState.OPERATIONAL,
]


def _by_state(components: Sequence[ComponentStatus]) -> list[tuple[ComponentState, list[str]]]:
    """Component display names grouped by state, worst state first, so several fit a post."""
    return [
        (state, names)
        for state in _STATE_ORDER
        if (names := [c.display_name for c in components if c.state == state])
    ]


def _from_context(context: Context, name: str) -> str:
    """The render's language or timezone, which filters need to be right, not just work."""
    value = context.get(name)
    if value is None:
        # Macros imported without context would silently get English labels and UTC.
        raise RenderError(
            f"a filter needs the {name}, which a macro imported without context does not see "
            "— import it with `{% import ... as m with context %}`"
        )
    return str(value)


def _as_datetime(value: Any, context: Context) -> datetime | None:
    """A datetime in the incident's timezone; ISO strings (fields) are parsed.

    Naive datetimes are UTC (code's convention); naive strings are in the incident's
    timezone (a person typing `--set starts_at=2026-11-28 02:00` means local time).
    Anything else (`about an hour`) gives None and is shown as written.
    """
    zone = ZoneInfo(_from_context(context, "timezone"))
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
    else:
        return None
    return moment.astimezone(zone)


def _zone_abbreviation(moment: datetime) -> str:
    abbreviation = moment.tzname() or "UTC"
    # Zones without a letter abbreviation (America/Sao_Paulo) give "-03": say "UTC-03".
    return f"UTC{abbreviation}" if abbreviation[0] in "+-" else abbreviation
