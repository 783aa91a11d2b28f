"""The self-service pages as HTML: subscribe, enter a code, answers, manage.

One template (`templates/forms.html`) in the status page's style and languages; the
server (`broadcaster/server/subscribe.py`) decides what a page says, this module only
renders it. The one script, the subscribe form's proof of work, is inline and allowed
by its hash in the pages' Content-Security-Policy.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import Any, Literal

from markupsafe import Markup

from broadcaster.site.form_strings import form_strings
from broadcaster.site.render import site_environment
from broadcaster.site.strings import language_name

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "ChannelChoice",
    "ComponentChoice",
    "FormPage",
    "LanguageLink",
    "Link",
    "View",
    "render_form_page",
]

_RTL_LANGUAGES = frozenset({"ar", "fa", "he", "ur", "yi"})


@cache
def _script() -> str:
    return files("broadcaster.site").joinpath("templates/proof_of_work.js").read_text("utf-8")


def _script_hash() -> str:
    digest = hashlib.sha256(_script().encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


# Nothing from elsewhere, no framing (clickjacking a form), forms only to this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"script-src '{_script_hash()}'; "
    "style-src 'unsafe-inline'; "
    "img-src data:; "
    "form-action 'self'; "
    "frame-ancestors 'none'; "
    "base-uri 'none'"
)


@dataclass(frozen=True)
class LanguageLink:
    """An entry of the language switch."""

    code: str
    href: str
    current: bool

    @property
    def name(self) -> str:
        return language_name(self.code)


@dataclass(frozen=True)
class LanguageOption:
    code: str
    selected: bool

    @property
    def name(self) -> str:
        return language_name(self.code)


@dataclass(frozen=True)
class ComponentChoice:
    name: str
    display_name: str
    checked: bool


@dataclass(frozen=True)
class ChannelChoice:
    """A subscriber channel on the manage page; `can_change` False: shown as text."""

    name: str
    label: str
    subscribed: bool
    can_change: bool


@dataclass(frozen=True)
class Link:
    href: str
    text: str


View = Literal["subscribe", "verify", "manage", "message"]


@dataclass
class FormPage:
    """What one self-service page shows; `strings` are its language's words."""

    view: View
    language: str
    title: str  # the status page's title
    heading: str
    home: str  # a relative link to the status page
    languages: list[LanguageLink] = field(default_factory=list)
    notice: str | None = None
    errors: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    # forms
    action: str = ""
    form_token: str = ""
    bits: int = 0
    address: str = ""
    address_label: str = ""
    address_hint: str | None = None
    autocomplete: str = "email"
    inputmode: str = "email"
    sms_offered: bool = False
    language_options: list[LanguageOption] = field(default_factory=list)
    components: list[ComponentChoice] = field(default_factory=list)
    pending: str = ""
    channels: list[ChannelChoice] = field(default_factory=list)

    @property
    def strings(self) -> dict[str, str]:
        return form_strings(self.language)

    def choose_language(self, options: list[str], selected: str) -> None:
        self.language_options = [LanguageOption(code, code == selected) for code in options]


def render_form_page(page: FormPage) -> bytes:
    """The page as UTF-8 HTML."""
    context: dict[str, Any] = {
        "view": page.view,
        "lang": page.language,
        "dir": "rtl" if page.language.split("-")[0].lower() in _RTL_LANGUAGES else "ltr",
        "t": page.strings,
        "title": page.title,
        "heading": page.heading,
        "home": page.home,
        "languages": page.languages,
        "notice": page.notice,
        "errors": page.errors,
        "lines": page.lines,
        "links": page.links,
        "action": page.action,
        "form_token": page.form_token,
        "bits": page.bits,
        "address": page.address,
        "address_label": page.address_label,
        "address_hint": page.address_hint,
        "autocomplete": page.autocomplete,
        "inputmode": page.inputmode,
        "sms_offered": page.sms_offered,
        "language_options": page.language_options,
        "components": page.components,
        "pending": page.pending,
        "channels": page.channels,
        # Only the subscribe form runs the proof of work.
        "script": Markup(_script()) if page.view == "subscribe" and page.bits > 0 else None,
    }
    html = site_environment().get_template("forms.html").render(context)
    return html.encode("utf-8")
