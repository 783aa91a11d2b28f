"""Self-service subscription on `serve`: the subscribe form, its confirmations, and the
manage page every email links to. Mounted only when `subscribers.self_service` is on.

- `GET /subscribe`: the form (an email address or a mobile number, the language, the
  components), in the status page's style and languages.
- `POST /subscribe`: an email gets a signed confirmation link (double opt-in), a mobile
  number a 6-digit code; either way the sign-up is *pending* (its own table, which no
  fan-out reads) until confirmed. `POST /subscribe/verify` takes the code (5 tries).
- `GET /subscribe/confirm?token=…`: the email's link.
- `GET|POST /manage/{token}`: channels, components, language; stop everything.
  `POST /manage/{token}/unsubscribe`: RFC 8058 one-click (List-Unsubscribe-Post).

**Abuse (decisions):** every POST to the form spends a token of the per-address
`inbound` limit (`server/limits.py`); each address gets at most
`pending_limit_per_address_per_day` confirmation messages a UTC day and all numbers
together `sms_codes_per_day` SMS codes, both counted in the store (they hold across
restarts and processes); SMS only to mobile numbers of `sms_countries`; and the form
carries a signed challenge the browser must solve (SHA-256 proof of work bound to the
address typed, `proof_of_work_bits`), so each message costs a script work. The form
token is also the CSRF token: it is bound to a random SameSite=Strict cookie.

**Never says who is subscribed:** an address already subscribed gets exactly the answer
and the message a new one gets; confirming applies the form's choices to it.
Addresses are logged masked; none is ever in a URL (links carry ids and nonces, signed).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import RedirectResponse

from broadcaster.core import Broadcaster
from broadcaster.errors import DeliveryError, NotFoundError
from broadcaster.models import AddressKind, Subscriber
from broadcaster.server.languages import negotiate_language
from broadcaster.site.form_strings import form_strings
from broadcaster.site.forms import (
    CONTENT_SECURITY_POLICY,
    ChannelChoice,
    ComponentChoice,
    FormPage,
    LanguageLink,
    Link,
    View,
    render_form_page,
)
from broadcaster.store.self_service import Confirmation, LimitReached, SelfServiceStore
from broadcaster.subscribers import InvalidSubscriberError, mask, normalise_email, normalise_phone
from broadcaster.tokens import ExpiredToken, InvalidToken, TokenError, Tokens, signing_key, solves
from channels.base import Channel

__all__ = ["SelfService", "subscribe_router"]

log = logging.getLogger("broadcaster.subscribe")

FORM_COOKIE = "broadcaster_form"
FORM_MAX_AGE_SECONDS = 3600  # a form (and its challenge) left open longer is sent again
MAX_FORM_BYTES = 16_384
MAX_CODE_ATTEMPTS = 5
CODE_DIGITS = 6
CLOCK_SLACK_SECONDS = 60


class _Refused(Exception):
    """A request answered with a page saying why (in the page's language)."""

    def __init__(self, status: int, key: str, **values: Any) -> None:
        super().__init__(key)
        self.status, self.key, self.values = status, key, values


@dataclass
class _Form:
    """A POSTed form: its fields and the page's language."""

    fields: dict[str, list[str]]
    language: str

    def get(self, name: str) -> str:
        values = self.fields.get(name)
        return values[0].strip() if values else ""

    def all(self, name: str) -> list[str]:
        return self.fields.get(name, [])


def _root(request: Request) -> str:
    """The relative way back to the site's root from this URL (so a sub-path works)."""
    depth = request.url.path.count("/") - 1
    return "../" * depth if depth > 0 else "./"


class SelfService:
    """The subscribe form and manage pages of one broadcaster."""

    def __init__(self, broadcaster: Broadcaster, languages: list[str]) -> None:
        self.broadcaster = broadcaster
        self.settings = broadcaster.settings.subscribers
        self.public_url = broadcaster.settings.serve.public_url or ""
        self.title = broadcaster.settings.page_title
        self.components = broadcaster.settings.components
        self.languages = languages
        self.rows = SelfServiceStore(broadcaster.store)
        # The subscriber channels of each kind: a confirmed sign-up is opted in to all.
        self.channels: dict[AddressKind, list[str]] = {}
        for name, channel in broadcaster.channels.items():
            if channel.address_kind is not None:
                self.channels.setdefault(channel.address_kind, []).append(name)
        # Confirmations go through instances of their own (their own SMTP sessions and
        # Twilio client), so the dispatcher's start/stop of the channels never meets them.
        self.senders: dict[AddressKind, Any] = {}
        for kind, names in self.channels.items():
            first = next(
                (broadcaster.channels[n] for n in names if _sends_notices(broadcaster.channels[n])),
                None,
            )
            if first is not None:
                self.senders[kind] = type(first)(first.name, first.config, first.context)
        key = signing_key(broadcaster.settings)
        self.tokens = Tokens(key) if key is not None else None
        if self.tokens is None:
            assert self.settings.secret is not None  # the config requires one
            log.error(
                "subscribers.secret not found in %s: the subscribe form and manage pages "
                "answer 503 until it is set",
                self.settings.secret.describe(),
            )

    @property
    def offers_email(self) -> bool:
        return AddressKind.EMAIL in self.senders

    @property
    def offers_sms(self) -> bool:
        return AddressKind.PHONE in self.senders and bool(self.settings.sms_countries)

    async def close(self) -> None:
        for sender in self.senders.values():
            await sender.close()

    def _tokens(self) -> Tokens:
        if self.tokens is None:
            raise _Refused(503, "unavailable")
        return self.tokens

    # --- languages and pages -------------------------------------------------------------

    def _language(self, request: Request, preferred: str | None = None) -> str:
        """`?lang=`, else the subscriber's language, else the browser's."""
        asked = request.query_params.get("lang")
        if asked in self.languages:
            return str(asked)
        if preferred is not None:
            return negotiate_language(preferred, self.languages, self.languages[0])
        return negotiate_language(
            request.headers.get("accept-language"), self.languages, self.languages[0]
        )

    def _page(self, request: Request, language: str, view: View, heading_key: str) -> FormPage:
        return FormPage(
            view=view,
            language=language,
            title=self.title,
            heading=form_strings(language)[heading_key],
            home=_root(request),
        )

    def _answer(
        self,
        request: Request,
        page: FormPage,
        *,
        status: int = 200,
        cookie: str | None = None,
    ) -> Response:
        headers = {
            # Personal and single-use: never cached, never framed, never a Referer
            # (manage and confirmation URLs carry tokens).
            "Cache-Control": "no-store",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Content-Language": page.language,
        }
        response = Response(
            render_form_page(page),
            status_code=status,
            media_type="text/html; charset=utf-8",
            headers=headers,
        )
        if cookie is not None:
            response.set_cookie(
                FORM_COOKIE,
                cookie,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
        return response

    def _message(
        self,
        request: Request,
        language: str,
        heading_key: str,
        *,
        lines: Sequence[str] = (),
        links: Sequence[Link] = (),
        status: int = 200,
    ) -> Response:
        page = self._page(request, language, "message", heading_key)
        page.lines, page.links = list(lines), list(links)
        return self._answer(request, page, status=status)

    def _refusal(self, request: Request, language: str, refused: _Refused) -> Response:
        strings = form_strings(language)
        heading = {
            "link_invalid": "link_invalid_heading",
            "link_expired": "link_expired_heading",
        }.get(refused.key, "error_heading")
        page = self._page(request, language, "message", heading)
        page.lines = [strings[refused.key].format(**refused.values)]
        page.links = [Link(_root(request) + "subscribe", strings["start_again"])]
        return self._answer(request, page, status=refused.status)

    # --- the form token: CSRF and proof-of-work challenge ---------------------------------

    def _cookie(self, request: Request) -> tuple[str, bool]:
        """The form cookie of this browser, or a new one; (value, new)."""
        value = request.cookies.get(FORM_COOKIE, "")
        if 16 <= len(value) <= 64 and value.replace("-", "").replace("_", "").isalnum():
            return value, False
        return secrets.token_urlsafe(24), True

    def _form_token(self, cookie: str, bits: int) -> str:
        tokens = self._tokens()
        return tokens.sign(
            "form", {"c": tokens.digest("cookie", cookie)[:32], "b": bits, "r": tokens.nonce()}
        )

    def _check_form(self, request: Request, form: _Form) -> dict[str, Any]:
        """The form token's payload, when it came back with this browser's cookie."""
        tokens = self._tokens()
        try:
            payload, _ = tokens.read("form", form.get("form"), max_age=FORM_MAX_AGE_SECONDS)
        except ExpiredToken:
            raise _Refused(400, "form_expired") from None
        except InvalidToken:
            raise _Refused(403, "form_expired") from None
        cookie = request.cookies.get(FORM_COOKIE)
        if not isinstance(payload, dict):
            raise _Refused(403, "form_expired")
        if not cookie:
            raise _Refused(403, "cookie_missing")
        if not hmac.compare_digest(str(payload.get("c")), tokens.digest("cookie", cookie)[:32]):
            raise _Refused(403, "cookie_missing")
        return payload

    async def _read_form(self, request: Request) -> _Form:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise _Refused(413, "form_expired")
        try:
            fields = parse_qs(
                body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=64
            )
        except ValueError:
            raise _Refused(400, "form_expired") from None
        ui = (fields.get("ui") or [""])[0]
        language = ui if ui in self.languages else self.languages[0]
        return _Form(fields=fields, language=language)

    # --- subscribe -----------------------------------------------------------------------

    def _subscribe_page(
        self,
        request: Request,
        language: str,
        *,
        cookie: str,
        address: str = "",
        chosen_language: str | None = None,
        components: list[str] | None = None,
        errors: Sequence[str] = (),
    ) -> FormPage:
        page = self._page(request, language, "subscribe", "subscribe_heading")
        strings = page.strings
        root = _root(request)
        page.languages = [
            LanguageLink(code, f"{root}subscribe?lang={code}", code == language)
            for code in self.languages
        ]
        page.action = root + "subscribe"
        page.bits = self.settings.proof_of_work_bits
        page.form_token = self._form_token(cookie, page.bits)
        page.address = address
        page.errors = list(errors)
        page.sms_offered = self.offers_sms
        if self.offers_sms and self.offers_email:
            page.address_label, page.autocomplete, page.inputmode = (
                strings["address_email_sms"],
                "email",
                "email",
            )
            page.address_hint = strings["address_hint_sms"]
        elif self.offers_sms:
            page.address_label, page.autocomplete, page.inputmode = (
                strings["address_sms"],
                "tel",
                "tel",
            )
            page.address_hint = strings["address_hint_sms"]
        else:
            page.address_label = strings["address_email"]
        page.choose_language(self.languages, chosen_language or language)
        page.components = [
            ComponentChoice(name, display, components is None or name in components)
            for name, display in self.components.items()
        ]
        return page

    async def form(self, request: Request) -> Response:
        language = self._language(request)
        try:
            cookie, new = self._cookie(request)
            page = self._subscribe_page(request, language, cookie=cookie)
        except _Refused as refused:
            return self._refusal(request, language, refused)
        response = self._answer(request, page, cookie=cookie if new else None)
        response.headers["Vary"] = "Accept-Language"
        return response

    async def subscribe(self, request: Request) -> Response:
        language = self.languages[0]
        form: _Form | None = None
        try:
            form = await self._read_form(request)
            language = form.language
            payload = self._check_form(request, form)
        except _Refused as refused:
            if form is not None and refused.key in ("form_expired", "cookie_missing"):
                # A fresh form with what they typed, and the reason on top.
                return self._form_again(request, form, [refused.key], refused.status)
            return self._refusal(request, language, refused)
        raw = form.get("address")
        chosen = form.get("language")
        if chosen not in self.languages:
            chosen = language
        picked = [c for c in form.all("components") if c in self.components]
        if not solves(form.get("form"), raw, form.get("nonce"), int(payload.get("b", 0))):
            return self._form_again(request, form, ["proof_failed"], 400)
        try:
            kind, address = self._address(raw)
        except _Refused as refused:
            keys = [refused.key] + (["no_component"] if self.components and not picked else [])
            return self._form_again(request, form, keys, refused.status)
        if self.components and not picked:
            return self._form_again(request, form, ["no_component"], 422)
        components = None if set(picked) == set(self.components) else picked
        try:
            if kind is AddressKind.EMAIL:
                await self._send_link(address, chosen, components)
                page = self._page(request, language, "message", "sent_heading")
                page.lines = [
                    page.strings["sent"].format(address=address, hours=self.settings.confirm_hours),
                    page.strings["sent_spam"],
                ]
                return self._answer(request, page)
            pending = await self._send_code(address, chosen, components)
        except _Refused as refused:
            return self._form_again(request, form, [refused.key], refused.status)
        return self._verify_page(request, language, pending, address=address)

    def _form_again(self, request: Request, form: _Form, keys: list[str], status: int) -> Response:
        """The subscribe form again, as it was filled, with why it was refused."""
        language = form.language
        try:
            cookie, new = self._cookie(request)
            chosen = form.get("language")
            picked = [c for c in form.all("components") if c in self.components]
            page = self._subscribe_page(
                request,
                language,
                cookie=cookie,
                address=form.get("address"),
                chosen_language=chosen if chosen in self.languages else None,
                components=picked,
            )
        except _Refused as refused:
            return self._refusal(request, language, refused)
        page.errors = [page.strings[key] for key in keys]
        return self._answer(request, page, status=status, cookie=cookie if new else None)

    def _address(self, raw: str) -> tuple[AddressKind, str]:
        """(kind, normalised address) of what was typed, or why it cannot be used."""
        if not raw:
            raise _Refused(422, "address_missing")
        if "@" in raw:
            if not self.offers_email:
                raise _Refused(422, "email_off")
            try:
                return AddressKind.EMAIL, normalise_email(raw)
            except InvalidSubscriberError:
                raise _Refused(422, "invalid_email") from None
        if not self.offers_sms:
            raise _Refused(422, "sms_off") if self.offers_email else _Refused(503, "unavailable")
        import phonenumbers

        try:
            number = normalise_phone(raw, self.settings.default_region)
        except InvalidSubscriberError:
            raise _Refused(422, "invalid_phone") from None
        parsed = phonenumbers.parse(number)
        if phonenumbers.region_code_for_number(parsed) not in self.settings.sms_countries:
            raise _Refused(422, "sms_country")
        types = phonenumbers.PhoneNumberType
        mobile = (types.MOBILE, types.FIXED_LINE_OR_MOBILE)
        if phonenumbers.number_type(parsed) not in mobile:
            # Premium-rate, shared-cost and the like: what SMS-pumping fraud sends codes to.
            raise _Refused(422, "sms_not_mobile")
        return AddressKind.PHONE, number

    async def _reserve(
        self,
        kind: AddressKind,
        address: str,
        language: str,
        components: list[str] | None,
        *,
        nonce: str,
        code_hash: str | None,
        lifetime: timedelta,
    ) -> int:
        tokens = self._tokens()
        try:
            pending = await self.rows.reserve(
                kind=kind,
                address=address,
                address_key=tokens.digest("address", _mailbox(kind, address))[:40],
                nonce=nonce,
                language=language,
                components=components,
                code_hash=code_hash,
                lifetime=lifetime,
                per_address=self.settings.pending_limit_per_address_per_day,
                sms_cap=self.settings.sms_codes_per_day if kind is AddressKind.PHONE else None,
            )
        except LimitReached as limit:
            log.warning(
                "self-service: %s refused, daily limit (%s) reached",
                mask(address),
                limit.which,
                extra={"outcome": f"limit_{limit.which}"},
            )
            if limit.which == "sms":
                raise _Refused(503, "sms_cap") from None
            raise _Refused(429, "address_limit") from None
        return pending.id

    async def _send_link(self, address: str, language: str, components: list[str] | None) -> None:
        tokens = self._tokens()
        nonce = tokens.nonce()
        hours = self.settings.confirm_hours
        pending_id = await self._reserve(
            AddressKind.EMAIL,
            address,
            language,
            components,
            nonce=nonce,
            code_hash=None,
            lifetime=timedelta(hours=hours),
        )
        token = tokens.sign("confirm-email", [pending_id, nonce])
        url = f"{self.public_url}/subscribe/confirm?token={quote(token, safe='')}"
        strings = form_strings(language)
        text = strings["confirm_email"].format(title=self.title, hours=hours, url=url)
        subject = strings["confirm_subject"].format(title=self.title)
        sender = self.senders[AddressKind.EMAIL]
        try:
            await sender.send_notice(address, subject, text, language=language)
        except DeliveryError as exc:
            await self.rows.forget(pending_id)
            log.warning("self-service: confirmation to %s not sent: %s", mask(address), exc)
            raise _Refused(503, "send_failed") from None
        log.info(
            "self-service: email sign-up pending, confirmation link sent to %s",
            mask(address),
            extra={"outcome": "pending"},
        )

    async def _send_code(
        self, number: str, language: str, components: list[str] | None
    ) -> tuple[int, str]:
        tokens = self._tokens()
        nonce = tokens.nonce()
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        minutes = self.settings.sms_code_minutes
        pending_id = await self._reserve(
            AddressKind.PHONE,
            number,
            language,
            components,
            nonce=nonce,
            code_hash=tokens.digest("sms-code", nonce, code),
            lifetime=timedelta(minutes=minutes),
        )
        strings = form_strings(language)
        text = strings["confirm_sms"].format(code=code, title=self.title, minutes=minutes)
        sender = self.senders[AddressKind.PHONE]
        try:
            await sender.send_notice(number, text, validity_seconds=minutes * 60)
        except DeliveryError as exc:
            await self.rows.forget(pending_id)
            log.warning("self-service: code to %s not sent: %s", mask(number), exc)
            raise _Refused(503, "send_failed") from None
        log.info(
            "self-service: SMS sign-up pending, code sent to %s",
            mask(number),
            extra={"outcome": "pending"},
        )
        return pending_id, nonce

    def _verify_page(
        self,
        request: Request,
        language: str,
        pending: tuple[int, str],
        *,
        address: str | None = None,
        errors: Sequence[str] = (),
    ) -> Response:
        page = self._page(request, language, "verify", "code_heading")
        cookie, new = self._cookie(request)
        page.form_token = self._form_token(cookie, 0)
        page.pending = self._tokens().sign("verify-sms", list(pending))
        page.action = _root(request) + "subscribe/verify"
        if address is not None:
            page.notice = page.strings["code_sent"].format(
                address=address, minutes=self.settings.sms_code_minutes
            )
        page.errors = list(errors)
        return self._answer(
            request, page, status=422 if errors else 200, cookie=cookie if new else None
        )

    async def verify(self, request: Request) -> Response:
        language = self.languages[0]
        try:
            form = await self._read_form(request)
            language = form.language
            self._check_form(request, form)
            tokens = self._tokens()
            try:
                payload, _ = tokens.read(
                    "verify-sms",
                    form.get("pending"),
                    max_age=self.settings.sms_code_minutes * 60 + FORM_MAX_AGE_SECONDS,
                )
                pending_id, nonce = int(payload[0]), str(payload[1])
            except ExpiredToken:
                raise _Refused(410, "code_expired") from None
            except (TokenError, TypeError, ValueError, IndexError, KeyError):
                raise _Refused(400, "link_invalid") from None
            code = "".join(c for c in form.get("code") if not c.isspace())
            confirmation = await self.rows.confirm(
                pending_id,
                nonce,
                self.channels,
                code_hash=tokens.digest("sms-code", nonce, code),
                max_attempts=MAX_CODE_ATTEMPTS,
            )
        except _Refused as refused:
            return self._refusal(request, language, refused)
        if confirmation.outcome == "wrong":
            wrong = form_strings(language)["code_wrong"]
            return self._verify_page(
                request,
                language,
                (pending_id, nonce),
                errors=[wrong.format(left=confirmation.attempts_left)],
            )
        return self._confirmed(request, language, confirmation, follow_signup=False)

    async def confirm(self, request: Request) -> Response:
        """The link of a confirmation email (a GET: mail scanners may open it too, which
        confirms what the address's owner was sent)."""
        language = self._language(request)
        try:
            tokens = self._tokens()
            try:
                payload, _ = tokens.read(
                    "confirm-email",
                    request.query_params.get("token", ""),
                    max_age=self.settings.confirm_hours * 3600,
                )
                pending_id, nonce = int(payload[0]), str(payload[1])
            except ExpiredToken:
                raise _Refused(410, "link_expired") from None
            except (TokenError, TypeError, ValueError, IndexError, KeyError):
                raise _Refused(400, "link_invalid") from None
            confirmation = await self.rows.confirm(pending_id, nonce, self.channels)
        except _Refused as refused:
            return self._refusal(request, language, refused)
        return self._confirmed(request, language, confirmation, follow_signup=True)

    def _confirmed(
        self, request: Request, language: str, confirmation: Confirmation, *, follow_signup: bool
    ) -> Response:
        """The page after a confirmation (email link or SMS code), whatever came of it: in
        the page's language, or (`follow_signup`: an email's link, which has no page
        before it) in the language the sign-up chose."""
        outcome = confirmation.outcome
        if outcome == "missing":
            return self._refusal(request, language, _Refused(404, "link_invalid"))
        if outcome == "expired":
            key = "code_expired" if confirmation.kind is AddressKind.PHONE else "link_expired"
            return self._refusal(request, language, _Refused(410, key))
        if outcome == "locked":
            return self._refusal(request, language, _Refused(403, "code_locked"))
        if (
            follow_signup
            and confirmation.language in self.languages
            and "lang" not in request.query_params
        ):
            language = str(confirmation.language)
        links: list[Link] = []
        strings = form_strings(language)
        if confirmation.subscriber_id is not None and self.tokens is not None:
            token = self.tokens.sign("manage", confirmation.subscriber_id)
            links.append(Link(f"{_root(request)}manage/{token}", strings["manage_link"]))
        if outcome == "used":
            return self._message(
                request, language, "used_heading", lines=[strings["used"]], links=links
            )
        how = "confirmed_sms" if confirmation.kind is AddressKind.PHONE else "confirmed_email"
        log.info(
            "self-service: subscriber #%s confirmed (%s)",
            confirmation.subscriber_id,
            "sms" if confirmation.kind is AddressKind.PHONE else "email",
            extra={"outcome": "confirmed"},
        )
        return self._message(
            request,
            language,
            "confirmed_heading",
            lines=[strings[how].format(title=self.title)],
            links=links,
        )

    # --- manage --------------------------------------------------------------------------

    async def _subscriber(self, token: str) -> Subscriber:
        """The subscriber a manage token names; link_invalid when it names nobody."""
        tokens = self._tokens()
        try:
            payload, signed_at = tokens.read("manage", token, max_age=None)
        except TokenError:
            raise _Refused(404, "link_invalid") from None
        if not isinstance(payload, int) or isinstance(payload, bool):
            raise _Refused(404, "link_invalid")
        try:
            subscriber = await self.broadcaster.audience.get(payload)
        except NotFoundError:
            raise _Refused(404, "link_invalid") from None
        # A token signed before this subscriber existed names someone erased whose id
        # was given again (SQLite reuses the highest id): not theirs to manage. A minute
        # of slack for clocks of several nodes (where ids are never reused anyway).
        if signed_at < subscriber.created_at - timedelta(seconds=CLOCK_SLACK_SECONDS):
            raise _Refused(404, "link_invalid")
        return subscriber

    def _manage_page(
        self,
        request: Request,
        language: str,
        token: str,
        subscriber: Subscriber,
        *,
        cookie: str,
        notice: str | None = None,
        errors: Sequence[str] = (),
    ) -> FormPage:
        page = self._page(request, language, "manage", "manage_heading")
        strings = page.strings
        root = _root(request)
        path = f"{root}manage/{token}"
        page.languages = [
            LanguageLink(code, f"{path}?lang={code}", code == language) for code in self.languages
        ]
        page.action = path
        page.form_token = self._form_token(cookie, 0)
        page.notice = notice
        page.errors = list(errors)
        kinds = {name: kind for kind, names in self.channels.items() for name in names}
        several = {kind: len(names) > 1 for kind, names in self.channels.items()}
        for name, subscribed in subscriber.channels.items():
            kind = kinds.get(name)
            if kind is None:
                continue
            address = mask(subscriber.address(kind))
            label = strings[_CHANNEL_LABELS[kind]]
            label = label.format(address=address) + (f" ({name})" if several[kind] else "")
            # Back in only where they can prove the address again (a new SMS code,
            # START, /subscribe): the link proves the inbox, nothing else.
            can_change = kind is AddressKind.EMAIL or subscribed
            if not can_change:
                label = strings[_STOPPED_LABELS[kind]].format(address=address)
            page.channels.append(ChannelChoice(name, label, subscribed, can_change))
        if page.notice is None and not any(subscriber.channels.get(name) for name in kinds):
            page.notice = strings["all_stopped"]
        page.choose_language(self.languages, subscriber.language)
        followed = subscriber.components
        page.components = [
            ComponentChoice(name, display, followed is None or name in followed)
            for name, display in self.components.items()
        ]
        return page

    async def manage(self, request: Request, token: str) -> Response:
        language = self._language(request)
        try:
            subscriber = await self._subscriber(token)
            language = self._language(request, subscriber.language)
            cookie, new = self._cookie(request)
            page = self._manage_page(request, language, token, subscriber, cookie=cookie)
        except _Refused as refused:
            return self._refusal(request, language, refused)
        return self._answer(request, page, cookie=cookie if new else None)

    async def change(self, request: Request, token: str) -> Response:
        language = self.languages[0]
        try:
            form = await self._read_form(request)
            language = form.language
            subscriber = await self._subscriber(token)
            self._check_form(request, form)
        except _Refused as refused:
            return self._refusal(request, language, refused)
        kinds = {name: kind for kind, names in self.channels.items() for name in names}
        checked = set(form.all("channels"))
        stop_all = form.get("action") == "unsubscribe"
        consents: dict[str, bool] = {}
        for name, subscribed in subscriber.channels.items():
            if name not in kinds:
                continue
            if stop_all:
                consents[name] = False
            elif kinds[name] is AddressKind.EMAIL or subscribed:
                consents[name] = name in checked
        picked = [c for c in form.all("components") if c in self.components]
        chosen = form.get("language")
        cookie, new = self._cookie(request)
        if self.components and not picked and not stop_all:
            errors = [form_strings(language)["no_component"]]
            page = self._manage_page(
                request, language, token, subscriber, cookie=cookie, errors=errors
            )
            return self._answer(request, page, status=422, cookie=cookie if new else None)
        # Stopping everything changes nothing else: it is one click, not a form to read.
        components = subscriber.components
        if not stop_all:
            components = None if set(picked) == set(self.components) else picked
        try:
            changed = await self.rows.change(
                subscriber.id,
                language=chosen if chosen in self.languages else subscriber.language,
                components=components,
                consents=consents,
            )
        except NotFoundError:
            return self._refusal(request, language, _Refused(404, "link_invalid"))
        log.info(
            "self-service: subscriber #%d %s",
            subscriber.id,
            "stopped every message" if stop_all else "changed their subscription",
            extra={"outcome": "unsubscribed" if stop_all else "changed"},
        )
        notice = form_strings(language)["unsubscribed" if stop_all else "saved"]
        page = self._manage_page(request, language, token, changed, cookie=cookie, notice=notice)
        return self._answer(request, page, cookie=cookie if new else None)

    async def one_click(self, token: str) -> Response:
        """RFC 8058: a mail provider POSTs `List-Unsubscribe=One-Click`; no page, no
        cookie, no form token (the signed link is the credential). Stops the emails."""
        try:
            subscriber = await self._subscriber(token)
        except _Refused as refused:
            return Response(status_code=refused.status)
        emails = set(self.channels.get(AddressKind.EMAIL, ()))
        consents = {name: False for name in subscriber.channels if name in emails}
        with contextlib.suppress(NotFoundError):  # erased meanwhile: nothing to stop
            await self.rows.change(
                subscriber.id,
                language=subscriber.language,
                components=subscriber.components,
                consents=consents,
            )
        log.info(
            "self-service: subscriber #%d unsubscribed by one-click",
            subscriber.id,
            extra={"outcome": "unsubscribed"},
        )
        return Response(status_code=200, headers={"Cache-Control": "no-store"})


# The manage page's line for a channel, and for one stopped, by what it delivers to.
_CHANNEL_LABELS = {
    AddressKind.EMAIL: "channel_email",
    AddressKind.PHONE: "channel_sms",
    AddressKind.TELEGRAM: "channel_telegram",
    AddressKind.WEBHOOK: "channel_webhook",
}
_STOPPED_LABELS = {
    AddressKind.EMAIL: "channel_email",  # never: email can always be changed here
    AddressKind.PHONE: "sms_stopped",
    AddressKind.TELEGRAM: "telegram_stopped",
    AddressKind.WEBHOOK: "webhook_stopped",
}


def _mailbox(kind: AddressKind, address: str) -> str:
    """The address as the per-address limit counts it: one mailbox however it is written
    (case, a +tag, Gmail's dots), so variants cannot each get their own messages."""
    if kind is AddressKind.PHONE:
        return address
    local, _, domain = address.lower().rpartition("@")
    local = local.split("+", 1)[0]
    if domain in ("gmail.com", "googlemail.com"):
        local, domain = local.replace(".", ""), "gmail.com"
    return f"{local}@{domain}"


def _sends_notices(channel: Channel) -> bool:
    return callable(getattr(channel, "send_notice", None))


def subscribe_router(broadcaster: Broadcaster, *, languages: list[str]) -> APIRouter:
    """The self-service routes; the notice channels close with the app."""
    service = SelfService(broadcaster, languages)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        try:
            yield {}
        finally:
            await service.close()

    router = APIRouter(include_in_schema=False, lifespan=lifespan)

    @router.get("/subscribe")
    async def subscribe_form(request: Request) -> Response:
        """The subscribe form."""
        return await service.form(request)

    @router.post("/subscribe")
    async def subscribe(request: Request) -> Response:
        """A sign-up: a confirmation link by email, or a code by SMS."""
        return await service.subscribe(request)

    @router.post("/subscribe/verify")
    async def verify(request: Request) -> Response:
        """The SMS code."""
        return await service.verify(request)

    @router.get("/subscribe/confirm")
    async def confirm(request: Request) -> Response:
        """The confirmation email's link."""
        return await service.confirm(request)

    @router.get("/manage/{token}")
    async def manage(request: Request, token: str) -> Response:
        """A subscriber's channels, components and language."""
        return await service.manage(request, token)

    @router.post("/manage/{token}")
    async def change(request: Request, token: str) -> Response:
        """Save the manage page's choices, or stop every message."""
        return await service.change(request, token)

    @router.post("/manage/{token}/unsubscribe")
    async def one_click(token: str) -> Response:
        """RFC 8058 one-click unsubscribe."""
        return await service.one_click(token)

    @router.get("/manage/{token}/unsubscribe")
    async def unsubscribe_page(token: str) -> Response:
        """Clients that open List-Unsubscribe in a browser get the manage page (a GET
        never unsubscribes: link scanners open links)."""
        return RedirectResponse(f"../{quote(token, safe='')}", status_code=303)

    return router
