"""The public side in a real browser (Debian's Chromium driven by Playwright): the banner
on an app of another origin, the status page, its languages and what a keyboard or
screen-reader user meets. Screenshots go to `artifacts/` (or `$ARTIFACTS_DIR`)."""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
import uvicorn

from broadcaster.config import Settings
from broadcaster.core import Broadcaster, PublishResult
from broadcaster.models import ComponentState, IncidentStatus, UpdateRequest
from broadcaster.server import create_app, server_config
from broadcaster.site.render import BANNER_REFRESH_SECONDS
from tests.conftest import require

try:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Page,
        Response,
        expect,
        sync_playwright,
    )
except ImportError:  # the `browser` fixture skips, or fails under CI
    sync_playwright = None

CHROMIUM = os.environ.get("BROADCASTER_TEST_CHROMIUM") or shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR") or Path(__file__).parent.parent / "artifacts")
ZONE = "Europe/Paris"
TITLE = "Charging sessions fail"
T = TypeVar("T")


# --- The two origins: the status server and an app that embeds its banner ----------


class StatusServer:
    """`broadcaster serve`'s app on uvicorn on 127.0.0.1, on its own thread and event
    loop, with the broadcaster whose store it serves (the tests publish through it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._broadcaster: Broadcaster | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._broadcaster = await Broadcaster.open(settings=self.settings)
            config = server_config(
                create_app(self._broadcaster), self.settings.serve, host="127.0.0.1", port=0
            )
            self._server = uvicorn.Server(config)
            task = asyncio.create_task(self._server.serve())
            while not self._server.started and not task.done():
                await asyncio.sleep(0.01)
            if self._server.started:
                port = self._server.servers[0].sockets[0].getsockname()[1]
                self.base = f"http://127.0.0.1:{port}"
            self._ready.set()
            await task
        finally:
            self._ready.set()
            if self._broadcaster is not None:
                await self._broadcaster.close()

    def __enter__(self) -> StatusServer:
        self._thread.start()
        assert self._ready.wait(timeout=30) and self.base, "the status server did not start"
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._loop is not None and self._server is not None
        self._loop.call_soon_threadsafe(setattr, self._server, "should_exit", True)
        self._thread.join(timeout=30)

    def run(self, make: Callable[[Broadcaster], Coroutine[Any, Any, T]]) -> T:
        """Run `make(broadcaster)` on the server's loop and return its result."""
        assert self._loop is not None and self._broadcaster is not None
        future = asyncio.run_coroutine_threadsafe(make(self._broadcaster), self._loop)
        return future.result(timeout=30)

    def publish(self, request: UpdateRequest, incident_id: int | None = None) -> PublishResult:
        return self.run(lambda b: b.publish(request, incident_id))


class AppSite:
    """A fictional app on its own port (another origin) whose page includes banner.js.

    `/?lang=fr` says `<html lang="fr">`; without `lang` the page names no language.
    """

    def __init__(self, status_base: str) -> None:
        script = html.escape(f"{status_base}/banner.js")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path != "/":
                    self.send_error(404)
                    return
                lang = query.removeprefix("lang=") if query.startswith("lang=") else ""
                lang_attr = f' lang="{html.escape(lang)}"' if lang else ""
                body = (
                    f"<!doctype html><html{lang_attr}><head><meta charset='utf-8'>"
                    "<title>Voltcharge</title><link rel='icon' href='data:,'>"
                    f"<script src='{script}' defer></script></head>"
                    "<body><main><h1>Voltcharge</h1><p>Find a charger near you.</p></main>"
                    "</body></html>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, lang: str | None = None) -> str:
        return f"{self.base}/?lang={lang}" if lang else f"{self.base}/"

    def __enter__(self) -> AppSite:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def status(tmp_path: Path) -> Iterator[StatusServer]:
    settings = Settings(
        channels={"status-page": {"type": "banner", "languages": ["en", "fr"]}},
        config_path=tmp_path / "broadcaster.toml",
        store=f"sqlite:///{tmp_path}/broadcaster.db",
        dispatch={"poll_seconds": 0.05, "lease_seconds": 5},
        page_title="Voltcharge status",
        timezone=ZONE,
        components={"app": "Mobile app", "chargers": "Chargers"},
        serve={"site_cache_seconds": 0},
    )
    with StatusServer(settings) as server:
        yield server


@pytest.fixture
def app(status: StatusServer) -> Iterator[AppSite]:
    with AppSite(status.base) as site:
        yield site


# --- The browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module (launching it costs about half a second)."""
    require(
        CHROMIUM is not None and os.access(CHROMIUM, os.X_OK),
        "Chromium is not installed (apt-get install chromium)",
    )
    require(sync_playwright is not None, "playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class Watched:
    """A page, with what a user (or their console) would see go wrong on it recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("console", self._console)
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text} ({message.location['url']})")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")


OpenPage = Callable[..., Watched]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    """A page in a fresh browser profile (its own storage), for a browser `locale`."""
    contexts = []

    def make(locale: str = "en-US", **options: Any) -> Watched:
        context = browser.new_context(locale=locale, **options)
        context.set_default_timeout(10_000)
        contexts.append(context)
        return Watched(context.new_page())

    yield make
    for context in contexts:
        context.close()


def screenshot(page: Page, name: str) -> None:
    """Keep a picture of what users see, for a person to look at after the run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)


# --- Updates ---------------------------------------------------------------------------


def opening(next_update_at: datetime | None = None) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.INVESTIGATING,
        title=TITLE,
        components={"app": ComponentState.MAJOR_OUTAGE},
        fields={"summary": "Starting a charge fails.", "summary.fr": "Le démarrage échoue."},
        next_update_at=next_update_at,
        actor="test",
    )


def identified(next_update_at: datetime | None = None) -> UpdateRequest:
    return UpdateRequest(
        status=IncidentStatus.IDENTIFIED,
        components={"app": ComponentState.PARTIAL_OUTAGE},
        fields={
            "summary": "A certificate expired on the payment gateway.",
            "summary.fr": "Un certificat a expiré sur la passerelle de paiement.",
        },
        next_update_at=next_update_at,
        actor="test",
    )


RESOLVED = UpdateRequest(status=IncidentStatus.RESOLVED, actor="test")


def in_minutes(minutes: int) -> tuple[datetime, str]:
    """A time `minutes` from now and how the page writes it (`10:40 CET`)."""
    moment = datetime.now(ZoneInfo(ZONE)) + timedelta(minutes=minutes)
    return moment, f"{moment:%H:%M} {moment.tzname()}"


# --- The banner on the app -------------------------------------------------------------


def test_banner_on_another_origin_shows_the_incident_and_leaves_when_resolved(
    status: StatusServer, app: AppSite, open_page: OpenPage
) -> None:
    due, due_text = in_minutes(30)
    opened = status.publish(opening(due))
    watched = open_page("en-US")
    page = watched.page
    page.clock.install()  # so the banner's minute-long polling can be run at once
    page.goto(app.url("en"))

    banner = page.get_by_role("status")
    expect(banner).to_contain_text(f"{TITLE} (Investigating)")
    expect(banner).to_contain_text("Starting a charge fails.")
    expect(banner).to_contain_text(f"Next update by {due_text}.")
    details = banner.get_by_role("link", name="Details")
    expect(details).to_have_attribute(
        "href", f"{status.base}/index.html#incident-{opened.incident.id}"
    )

    status.publish(RESOLVED, opened.incident.id)
    page.clock.run_for(BANNER_REFRESH_SECONDS * 1000)  # the next poll, no reload
    expect(banner).to_be_empty()
    expect(page.get_by_text(TITLE)).to_be_hidden()
    assert watched.problems == []


def test_banner_speaks_the_apps_language_then_the_browsers(
    status: StatusServer, app: AppSite, open_page: OpenPage
) -> None:
    _due, due_text = in_minutes(45)
    opened = status.publish(opening(_due))

    # A French browser on an app that names no language of its own: French.
    french = open_page("fr-FR")
    french.page.goto(app.url())
    banner = french.page.get_by_role("status")
    expect(banner).to_contain_text(f"{TITLE} (Enquête en cours)")
    expect(banner).to_contain_text("Le démarrage échoue.")
    expect(banner).to_contain_text(f"Prochaine mise à jour avant {due_text}.")
    expect(banner.get_by_role("button", name="Fermer")).to_be_visible()
    expect(banner.locator("[lang]").first).to_have_attribute("lang", "fr")

    # Details opens the French status page at the incident.
    banner.get_by_role("link", name="Détails").click()
    expect(french.page).to_have_url(f"{status.base}/fr/index.html#incident-{opened.incident.id}")
    expect(french.page.locator("html")).to_have_attribute("lang", "fr")
    expect(french.page.locator(f"#incident-{opened.incident.id}")).to_be_in_viewport()

    # The same French browser on an app in English: the app's language wins.
    english = open_page("fr-FR")
    english.page.goto(app.url("en"))
    expect(english.page.get_by_role("status")).to_contain_text("Starting a charge fails.")
    assert french.problems == [] and english.problems == []


def test_dismissed_banner_stays_hidden_on_reload_until_the_next_update(
    status: StatusServer, app: AppSite, open_page: OpenPage
) -> None:
    opened = status.publish(opening())
    watched = open_page("fr-FR")
    page = watched.page
    page.goto(app.url("fr"))
    banner = page.get_by_role("status")
    expect(banner).to_contain_text("Le démarrage échoue.")

    banner.get_by_role("button", name="Fermer").click()
    expect(banner).to_be_empty()
    page.reload()
    expect(page.get_by_role("status")).to_be_attached()  # the script ran again...
    page.wait_for_load_state("networkidle")  # ...and fetched the status
    expect(page.get_by_role("status")).to_be_empty()  # ...and kept the dismissal

    status.publish(identified(), opened.incident.id)
    page.reload()
    expect(page.get_by_role("status")).to_contain_text("Un certificat a expiré")
    assert watched.problems == []


# --- The status page -------------------------------------------------------------------


def test_status_page_shows_the_thread_next_update_components_then_history(
    status: StatusServer, open_page: OpenPage
) -> None:
    opened = status.publish(opening())
    due, due_text = in_minutes(40)
    status.publish(identified(due), opened.incident.id)
    watched = open_page("en-GB")
    page = watched.page
    page.goto(f"{status.base}/")

    active = page.get_by_role("region", name="Active incidents")
    incident = active.get_by_role("article", name=TITLE)
    expect(incident).to_contain_text("Impact: Major")
    expect(incident.locator(".update-meta")).to_have_text(
        [re.compile(r"^Identified · "), re.compile(r"^Investigating · ")]  # newest first
    )
    expect(incident).to_contain_text("A certificate expired on the payment gateway.")
    expect(incident).to_contain_text("Starting a charge fails.")
    expect(incident.locator(".next-update")).to_have_text(f"Next update by {due_text}")
    components = page.get_by_role("region", name="Components").get_by_role("listitem")
    expect(components).to_have_text(
        [re.compile("Mobile app.*Partial outage"), re.compile("Chargers.*Operational")]
    )
    expect(page.get_by_role("region", name="Current status")).to_contain_text(
        "Partial system outage"
    )
    screenshot(page, "status-page-open.png")
    page.set_viewport_size({"width": 390, "height": 844})
    no_sideways_scroll = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(no_sideways_scroll), "the page scrolls sideways on a phone"
    screenshot(page, "status-page-open-phone.png")

    status.publish(RESOLVED, opened.incident.id)
    page.set_viewport_size({"width": 1280, "height": 720})
    page.reload()
    expect(active).to_contain_text("No incidents right now.")
    expect(page.get_by_role("region", name="Components")).not_to_contain_text("outage")
    history = page.get_by_role("region", name="Recently resolved").get_by_role(
        "article", name=TITLE
    )
    expect(history).to_contain_text("Resolved")
    expect(history.locator(".next-update")).to_have_count(0)  # nothing more is promised
    history.get_by_text("Show updates (3)").click()  # the whole thread, on demand
    expect(history.get_by_text("A certificate expired on the payment gateway.")).to_be_visible()
    screenshot(page, "status-page-resolved.png")
    assert watched.problems == []


def test_status_page_language_follows_the_browser_and_the_switch_wins(
    status: StatusServer, open_page: OpenPage
) -> None:
    status.publish(opening())
    watched = open_page("fr-FR")  # Accept-Language: fr-FR
    page = watched.page
    page.goto(f"{status.base}/")
    expect(page).to_have_url(f"{status.base}/fr/")
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    expect(page.get_by_role("heading", name="Incidents en cours")).to_be_visible()
    expect(page.get_by_text("Le démarrage échoue.")).to_be_visible()

    page.get_by_role("navigation", name="Langue").get_by_role("link", name="English").click()
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.get_by_role("heading", name="Active incidents")).to_be_visible()
    page.reload()  # still the reader's choice, whatever the browser asks for
    expect(page.locator("html")).to_have_attribute("lang", "en")
    page.get_by_role("link", name="Français").click()
    expect(page).to_have_url(f"{status.base}/fr/index.html")
    expect(page.locator("html")).to_have_attribute("lang", "fr")
    assert watched.problems == []


@pytest.mark.parametrize(
    ("path", "lang", "switch"), [("/", "en", "Language"), ("/fr/", "fr", "Langue")]
)
def test_status_page_is_usable_with_a_keyboard_and_a_screen_reader(
    status: StatusServer, open_page: OpenPage, path: str, lang: str, switch: str
) -> None:
    status.publish(opening())
    watched = open_page("en-US")
    page = watched.page
    page.goto(f"{status.base}{path}")

    expect(page.locator("html")).to_have_attribute("lang", lang)
    expect(page.get_by_role("main")).to_have_count(1)
    expect(page.get_by_role("heading", level=1)).to_have_text("Voltcharge status")
    levels = page.locator("h1, h2, h3, h4, h5, h6").evaluate_all(
        "hs => hs.map(h => Number(h.tagName[1]))"
    )
    assert levels[0] == 1 and all(b - a <= 1 for a, b in pairwise(levels)), levels
    # Pictures and symbols say something in words, or are hidden from screen readers.
    unlabelled = page.locator(
        "img:not([alt]), svg:not([aria-hidden='true']):not([aria-label]),"
        " .symbol:not([aria-hidden='true'])"
    )
    expect(unlabelled).to_have_count(0)

    # From the top, Tab reaches "skip to content", then each language.
    page.keyboard.press("Tab")
    skip = page.locator(":focus")
    expect(skip).to_have_attribute("href", "#main")
    expect(skip).to_be_in_viewport()  # visible when focused
    languages = page.get_by_role("navigation", name=switch)
    for name in ("English", "Français"):
        page.keyboard.press("Tab")
        expect(languages.get_by_role("link", name=name)).to_be_focused()
    assert watched.problems == []
