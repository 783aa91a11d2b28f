"""The public side renders every file from one snapshot: page, banner, feeds, Statuspage JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from broadcaster.models import (
    ComponentState,
    ComponentStatus,
    Impact,
    IncidentKind,
    IncidentStatus,
    Rendered,
)
from broadcaster.site import (
    Indicator,
    PublicIncident,
    PublicState,
    PublicUpdate,
    render_site,
    write_site,
)
from tests.conftest import require

ATOM = "{http://www.w3.org/2005/Atom}"


def at(hour: int, minute: int = 0, day: int = 26) -> datetime:
    return datetime(2025, 11, day, hour, minute, tzinfo=UTC)


def texts(en: str, fr: str) -> dict[str, Rendered]:
    return {
        "en": Rendered(language="en", text=en, subject=f"[Acme] {en[:20]}"),
        "fr": Rendered(language="fr", text=fr, subject=f"[Acme] {fr[:20]}"),
    }


def open_incident(**overrides: object) -> PublicIncident:
    fields: dict[str, object] = {
        "id": 1,
        "kind": IncidentKind.INCIDENT,
        "title": "API errors",
        "status": IncidentStatus.IDENTIFIED,
        "impact": Impact.MAJOR,
        "components": {
            "api": ComponentState.PARTIAL_OUTAGE,
            "web": ComponentState.DEGRADED_PERFORMANCE,
        },
        "created_at": at(8, 30),
        "updates": [
            PublicUpdate(
                id=12,
                status=IncidentStatus.IDENTIFIED,
                created_at=at(8, 55),
                next_update_at=at(9, 40),
                texts=texts(
                    "We found the cause: a bad deploy.\n\nDetails at https://example.com/pm?a=1&b=2.",
                    "Nous avons trouvé la cause : un mauvais déploiement.",
                ),
            ),
            PublicUpdate(
                id=11,
                status=IncidentStatus.INVESTIGATING,
                created_at=at(8, 30),
                texts=texts("We are investigating API errors.", "Nous enquêtons sur des erreurs."),
            ),
        ],
    }
    fields.update(overrides)
    return PublicIncident.model_validate(fields)


def resolved_incident() -> PublicIncident:
    return PublicIncident(
        id=2,
        kind=IncidentKind.INCIDENT,
        title="Slow logins",
        status=IncidentStatus.RESOLVED,
        impact=Impact.MINOR,
        components={"web": ComponentState.DEGRADED_PERFORMANCE},
        created_at=at(14, day=24),
        resolved_at=at(15, day=24),
        updates=[
            PublicUpdate(
                id=8,
                status=IncidentStatus.RESOLVED,
                created_at=at(15, day=24),
                texts=texts("Logins are fast again.", "Les connexions sont de nouveau rapides."),
            ),
            PublicUpdate(
                id=7,
                status=IncidentStatus.INVESTIGATING,
                created_at=at(14, day=24),
                texts=texts("Logins are slow.", "Les connexions sont lentes."),
            ),
        ],
    )


def scheduled_maintenance() -> PublicIncident:
    return PublicIncident(
        id=3,
        kind=IncidentKind.MAINTENANCE,
        title="Database upgrade",
        status=IncidentStatus.SCHEDULED,
        impact=Impact.NONE,
        components={"db": ComponentState.UNDER_MAINTENANCE},
        created_at=at(7),
        scheduled_for=at(22, day=28),
        scheduled_until=at(23, 30, day=28),
        updates=[
            PublicUpdate(
                id=10,
                status=IncidentStatus.SCHEDULED,
                created_at=at(7),
                texts=texts("The database will be upgraded.", "La base sera mise à niveau."),
            )
        ],
    )


COMPONENTS = [
    ComponentStatus(name="api", display_name="Public API", state=ComponentState.PARTIAL_OUTAGE),
    ComponentStatus(name="web", display_name="Website", state=ComponentState.DEGRADED_PERFORMANCE),
    ComponentStatus(name="db", display_name="Database", state=ComponentState.OPERATIONAL),
    ComponentStatus(name="search", display_name="Search", state=ComponentState.UNDER_MAINTENANCE),
]


def make_state(**overrides: object) -> PublicState:
    fields: dict[str, object] = {
        "page_title": "Acme Status",
        "languages": ["en", "fr"],
        "timezone": "Europe/Paris",
        "generated_at": at(9, 10),
        "status_page_url": "https://status.example.com",
        "components": COMPONENTS,
        "incidents": [open_incident(), resolved_incident(), scheduled_maintenance()],
    }
    fields.update(overrides)
    return PublicState.model_validate(fields)


def all_operational() -> PublicState:
    return make_state(
        components=[c.model_copy(update={"state": ComponentState.OPERATIONAL}) for c in COMPONENTS],
        incidents=[resolved_incident()],
    )


@pytest.fixture(scope="module")
def site() -> dict[str, bytes]:
    return render_site(make_state())


def html(site: dict[str, bytes], path: str = "index.html") -> str:
    return site[path].decode("utf-8")


def test_renders_every_file_of_the_site(site: dict[str, bytes]) -> None:
    assert set(site) == {
        "index.html",
        "fr/index.html",
        "status.en.json",
        "status.fr.json",
        "banner.js",
        "feed.atom",
        "feed.fr.atom",
        "api/v2/summary.json",
        "api/v2/status.json",
    }


def test_index_is_the_default_language_page_readable_on_a_phone(site: dict[str, bytes]) -> None:
    page = html(site)
    assert page.startswith("<!doctype html>")
    assert '<html lang="en"' in page
    assert 'name="viewport"' in page
    assert "<main" in page and "<header" in page and "<footer" in page
    assert "<h1>Acme Status</h1>" in page
    # No external assets, no script: the page must load when everything else is down.
    assert "<script" not in page
    assert 'rel="stylesheet"' not in page


def test_page_icon_is_inline_in_the_overall_colour_so_no_favicon_404(
    site: dict[str, bytes],
) -> None:
    # Regression: without an icon every browser asked for /favicon.ico and logged a 404.
    icon = re.search(r'<link rel="icon" href="(data:image/svg\+xml,[^"]+)">', html(site))
    assert icon is not None and "%23bc4c00" in icon.group(1)  # major: orange


def test_index_shows_open_incident_thread_newest_first(site: dict[str, bytes]) -> None:
    page = html(site)
    assert "API errors" in page
    newest = page.index("We found the cause")
    oldest = page.index("We are investigating API errors")
    assert newest < oldest
    assert 'id="update-12"' in page and 'id="update-11"' in page
    # Times are in the page's time zone (Paris, UTC+1 in November).
    assert "26 Nov 2025, 09:55 CET" in page


def test_index_promises_next_update_in_page_time_zone(site: dict[str, bytes]) -> None:
    page = html(site)
    assert "Next update by" in page
    assert '<time datetime="2025-11-26T10:40:00+01:00">10:40 CET</time>' in page


def test_next_update_on_another_day_shows_the_date() -> None:
    incident = open_incident()
    incident.updates[0].next_update_at = at(8, day=27)
    page = html(render_site(make_state(incidents=[incident])))
    assert "Next update by" in page
    assert "27 Nov 2025, 09:00 CET" in page


def test_component_states_have_text_labels_not_only_colours(site: dict[str, bytes]) -> None:
    page = html(site)
    for label in ("Partial outage", "Degraded performance", "Operational", "Under maintenance"):
        assert label in page
    assert "Partial system outage" in page  # the overall banner


def test_links_between_language_versions(site: dict[str, bytes]) -> None:
    assert 'href="fr/index.html"' in html(site)
    fr = html(site, "fr/index.html")
    assert 'href="../index.html"' in fr
    assert 'hreflang="en"' in fr


def test_french_page_has_french_labels_and_texts(site: dict[str, bytes]) -> None:
    fr = html(site, "fr/index.html")
    assert '<html lang="fr"' in fr
    assert "Panne partielle" in fr
    assert "Performances dégradées" in fr
    assert "Prochaine mise à jour avant" in fr
    assert "Nous avons trouvé la cause" in fr
    assert "We found the cause" not in fr
    assert "26 nov. 2025 à 09:55 CET" in fr
    assert 'href="../feed.fr.atom"' in fr


def test_resolved_and_scheduled_maintenance_are_listed(site: dict[str, bytes]) -> None:
    page = html(site)
    resolved = page.index("Recently resolved")
    assert page.index("Slow logins") > resolved
    assert "Logins are fast again." in page
    assert "Scheduled maintenance" in page
    assert "Database upgrade" in page
    assert "28 Nov 2025, 23:00 CET" in page  # the window, in Paris time


def test_links_in_update_text_are_clickable_and_escaped(site: dict[str, bytes]) -> None:
    page = html(site)
    url = "https://example.com/pm?a=1&amp;b=2"
    assert f'<a href="{url}">{url}</a>.' in page


def test_title_and_text_with_markup_are_escaped() -> None:
    evil = "<script>alert(1)</script>"
    incident = open_incident(title=f"Outage {evil}")
    incident.updates[0].texts["en"] = Rendered(language="en", text=f"Text {evil}")
    files = render_site(make_state(incidents=[incident]))
    page = html(files)
    assert evil not in page
    assert "Outage &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Text &lt;script&gt;" in page
    # Other formats carry it as data, still well-formed.
    feed = ET.fromstring(files["feed.atom"])
    titles = [e.findtext(f"{ATOM}title") for e in feed.iter(f"{ATOM}entry")]
    assert any(evil in (t or "") for t in titles)
    assert json.loads(files["status.en.json"])["incidents"][0]["title"] == f"Outage {evil}"


@pytest.mark.parametrize(
    ("language", "text"),
    [
        ("en", "We found the cause: a bad deploy."),
        ("fr", "Nous avons trouvé la cause : un mauvais déploiement."),
    ],
)
def test_status_json_carries_open_incident_in_its_language(
    site: dict[str, bytes], language: str, text: str
) -> None:
    data = json.loads(site[f"status.{language}.json"])
    assert data["language"] == language
    assert data["generated_at"] == "2025-11-26T09:10:00Z"
    assert data["overall"]["state"] == "partial_outage"
    assert data["overall"]["indicator"] == "major"
    assert [c["name"] for c in data["components"]] == ["api", "web", "db", "search"]
    [incident] = data["incidents"]
    assert incident["id"] == 1
    assert incident["title"] == "API errors"
    assert incident["update_id"] == 12
    assert incident["text"].startswith(text)
    assert incident["next_update_at"] == "2025-11-26T09:40:00Z"
    assert incident["next_update_by"] == "10:40 CET"
    assert [m["id"] for m in data["scheduled_maintenances"]] == [3]


def test_status_json_links_to_the_page_in_its_language(site: dict[str, bytes]) -> None:
    fr = json.loads(site["status.fr.json"])
    assert fr["incidents"][0]["url"] == "https://status.example.com/fr/#incident-1"
    assert fr["incidents"][0]["path"] == "fr/index.html#incident-1"
    assert fr["labels"]["dismiss"] == "Fermer"


def test_atom_feed_has_one_entry_per_update(site: dict[str, bytes]) -> None:
    feed = ET.fromstring(site["feed.atom"])
    assert feed.tag == f"{ATOM}feed"
    for required in ("id", "title", "updated"):
        assert feed.findtext(f"{ATOM}{required}")
    assert feed.findtext(f"{ATOM}author/{ATOM}name") == "Acme Status"
    assert feed.findtext(f"{ATOM}updated") == "2025-11-26T08:55:00Z"
    entries = feed.findall(f"{ATOM}entry")
    assert len(entries) == 5  # 2 + 2 + 1 updates
    for entry in entries:
        for required in ("id", "title", "updated", "content"):
            assert entry.find(f"{ATOM}{required}") is not None, required
    ids = [e.findtext(f"{ATOM}id") for e in entries]
    assert len(set(ids)) == len(ids)
    assert entries[0].findtext(f"{ATOM}title") == "API errors — Identified"
    assert (entries[0].findtext(f"{ATOM}content") or "").startswith("We found the cause")


def test_atom_feed_per_language(site: dict[str, bytes]) -> None:
    feed = ET.fromstring(site["feed.fr.atom"])
    assert feed.get("{http://www.w3.org/XML/1998/namespace}lang") == "fr"
    first = feed.findall(f"{ATOM}entry")[0]
    assert (first.findtext(f"{ATOM}content") or "").startswith("Nous avons trouvé")


def test_atom_ids_are_stable_without_a_public_url() -> None:
    state = make_state(status_page_url=None)
    first = ET.fromstring(render_site(state)["feed.atom"])
    again = ET.fromstring(render_site(state)["feed.atom"])
    ids = [e.findtext(f"{ATOM}id") for e in first.iter(f"{ATOM}entry")]
    assert all((i or "").startswith("urn:uuid:") for i in ids)
    assert ids == [e.findtext(f"{ATOM}id") for e in again.iter(f"{ATOM}entry")]


def test_summary_json_has_statuspage_shape(site: dict[str, bytes]) -> None:
    summary = json.loads(site["api/v2/summary.json"])
    assert set(summary) >= {"page", "status", "components", "incidents", "scheduled_maintenances"}
    assert summary["page"]["name"] == "Acme Status"
    assert summary["status"] == {"indicator": "major", "description": "Partial System Outage"}
    assert {"id": "api", "name": "Public API", "status": "partial_outage"}.items() <= summary[
        "components"
    ][0].items()
    [incident] = summary["incidents"]  # unresolved only, like Statuspage
    assert incident["id"] == "1"
    assert incident["impact"] == "major"
    assert [u["id"] for u in incident["incident_updates"]] == ["12", "11"]
    assert incident["incident_updates"][0]["body"].startswith("We found the cause")
    [maintenance] = summary["scheduled_maintenances"]
    assert maintenance["scheduled_for"] == "2025-11-28T22:00:00Z"
    status = json.loads(site["api/v2/status.json"])
    assert status["status"]["indicator"] == "major"


def test_major_outage_component_reads_critical_like_statuspage() -> None:
    state = make_state(
        components=[
            ComponentStatus(name="api", display_name="API", state=ComponentState.MAJOR_OUTAGE)
        ],
        incidents=[open_incident(impact=Impact.MINOR)],
    )
    overall = state.overall()
    assert overall.state is ComponentState.MAJOR_OUTAGE
    assert overall.indicator is Indicator.CRITICAL
    summary = json.loads(render_site(state)["api/v2/summary.json"])
    assert summary["status"] == {"indicator": "critical", "description": "Major Service Outage"}


def test_incident_impact_raises_indicator_before_components_change() -> None:
    state = make_state(
        components=[c.model_copy(update={"state": ComponentState.OPERATIONAL}) for c in COMPONENTS]
    )
    assert state.overall().indicator is Indicator.MAJOR


def test_all_operational_says_so_and_banner_has_no_incident() -> None:
    state = all_operational()
    overall = state.overall()
    assert overall.is_operational
    files = render_site(state)
    assert "All systems operational" in html(files)
    assert "No incidents right now." in html(files)
    assert "Tous les systèmes sont opérationnels" in html(files, "fr/index.html")
    banner = json.loads(files["status.en.json"])
    assert banner["incidents"] == []
    assert banner["overall"]["indicator"] == "none"
    summary = json.loads(files["api/v2/summary.json"])
    assert summary["status"] == {"indicator": "none", "description": "All Systems Operational"}
    assert summary["incidents"] == []


def test_maintenance_in_progress_is_in_the_banner_not_the_indicator() -> None:
    maintenance = scheduled_maintenance().model_copy(update={"status": IncidentStatus.IN_PROGRESS})
    state = make_state(
        components=[
            ComponentStatus(name="db", display_name="DB", state=ComponentState.UNDER_MAINTENANCE)
        ],
        incidents=[maintenance],
    )
    files = render_site(state)
    banner = json.loads(files["status.en.json"])
    assert [i["id"] for i in banner["incidents"]] == [3]
    assert banner["overall"]["description"] == "Service under maintenance"
    summary = json.loads(files["api/v2/summary.json"])
    assert summary["status"] == {"indicator": "none", "description": "Service Under Maintenance"}


def test_untranslated_language_falls_back_to_english_labels_and_default_text() -> None:
    files = render_site(make_state(languages=["en", "fr", "de"]))
    de = html(files, "de/index.html")
    assert '<html lang="de"' in de
    assert "Partial outage" in de  # no German UI strings: English
    assert "We found the cause" in de  # no German text: the default language
    assert "Deutsch" in html(files)
    assert "status.de.json" in files and "feed.de.atom" in files


def test_naive_datetimes_are_taken_as_utc() -> None:
    state = make_state(generated_at=datetime(2025, 11, 26, 9, 10))
    assert json.loads(render_site(state)["status.en.json"])["generated_at"] == (
        "2025-11-26T09:10:00Z"
    )


def test_state_rejects_unknown_time_zone_and_unsafe_language() -> None:
    with pytest.raises(ValidationError, match="unknown time zone"):
        make_state(timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="not a language tag"):
        make_state(languages=["en", "../etc"])


def test_render_is_deterministic() -> None:
    assert render_site(make_state()) == render_site(make_state())


def test_banner_script_knows_the_languages(site: dict[str, bytes]) -> None:
    script = site["banner.js"].decode()
    assert '"languages": ["en", "fr"]' in script
    assert "data-lang" in script
    assert "localStorage" in script
    assert 'setAttribute("role", "status")' in script
    assert 'setAttribute("aria-live", "polite")' in script


def test_write_site_writes_atomically_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "public"
    first = render_site(make_state())
    written = write_site(first, out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(first)
    for name, content in first.items():
        assert (out / name).read_bytes() == content
    assert oct((out / "index.html").stat().st_mode & 0o777) == oct(0o644)

    second = render_site(all_operational())
    write_site(second, out)
    assert (out / "index.html").read_bytes() == second["index.html"]
    assert "All systems operational" in (out / "index.html").read_text()
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_write_site_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inside the site"):
        write_site({"../escape.html": b"x"}, tmp_path / "out")
    assert not (tmp_path / "escape.html").exists()


# --- banner.js, run in Node against a minimal DOM ----------------------------------

BANNER_HARNESS = r"""
const fs = require("fs");
const vm = require("vm");
const [scriptPath, first, second] = process.argv.slice(2).map((p) => fs.readFileSync(p, "utf8"));
const payloads = [JSON.parse(first), JSON.parse(second)];

class Node {
  constructor(tag) {
    this.tagName = tag; this.children = []; this.attrs = {}; this.style = {};
    this.listeners = {}; this._text = "";
  }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; }
  removeAttribute(k) { delete this.attrs[k]; }
  appendChild(c) { this.children.push(c); return c; }
  insertBefore(c, ref) {
    const i = ref ? this.children.indexOf(ref) : -1;
    if (i < 0) this.children.push(c); else this.children.splice(i, 0, c);
    return c;
  }
  removeChild(c) { this.children.splice(this.children.indexOf(c), 1); return c; }
  get firstChild() { return this.children[0] || null; }
  addEventListener(t, f) { this.listeners[t] = f; }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); }
  find(tag) {
    for (const c of this.children) {
      if (c.tagName === tag) return c;
      const found = c.find ? c.find(tag) : null;
      if (found) return found;
    }
    return null;
  }
}
const body = new Node("body");
body.appendChild(new Node("p"));
const storage = {};
const requested = [];
let payload = payloads[0];
let tick = null;
const document = {
  body, hidden: false, documentElement: { lang: "de" },
  currentScript: {
    src: "https://status.example.com/assets/banner.js",
    getAttribute: (k) => (k === "data-lang" ? "fr-CA" : null),
  },
  createElement: (tag) => new Node(tag),
  createTextNode: (text) => ({ textContent: text }),
  addEventListener: () => {},
};
const window = {
  fetch: (url) => {
    requested.push(url);
    return Promise.resolve({ ok: true, json: () => Promise.resolve(payload) });
  },
  localStorage: { getItem: (k) => storage[k] ?? null, setItem: (k, v) => { storage[k] = v; } },
  setInterval: (f, ms) => { tick = f; window.interval = ms; },
};
const flush = () => new Promise((r) => setTimeout(r, 0));
(async () => {
  vm.runInNewContext(scriptPath, { window, document, fetch: window.fetch, URL, JSON });
  await flush();
  const region = body.children[0];
  const out = { requested: requested[0], interval: window.interval };
  out.role = region.getAttribute("role");
  out.live = region.getAttribute("aria-live");
  out.shown = region.textContent;
  out.link = region.find("a").href;
  region.find("button").listeners.click();
  out.afterDismiss = region.textContent;
  tick(); await flush();
  out.afterRefresh = region.textContent;
  payload = payloads[1];
  tick(); await flush();
  out.afterNewUpdate = region.textContent;
  process.stdout.write(JSON.stringify(out));
})();
"""


def test_banner_script_shows_dismisses_and_reshows_on_new_update(
    site: dict[str, bytes], tmp_path: Path
) -> None:
    node = shutil.which("node")
    require(node is not None, "node is not installed: cannot run banner.js")
    assert node is not None
    newer = json.loads(site["status.fr.json"])
    newer["incidents"][0]["update_id"] = 13
    newer["incidents"][0]["summary"] = "Correctif en cours de déploiement."
    (tmp_path / "harness.js").write_text(BANNER_HARNESS)
    (tmp_path / "banner.js").write_bytes(site["banner.js"])
    (tmp_path / "first.json").write_bytes(site["status.fr.json"])
    (tmp_path / "second.json").write_text(json.dumps(newer))
    result = subprocess.run(
        [node, "harness.js", "banner.js", "first.json", "second.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = json.loads(result.stdout)
    # data-lang="fr-CA" picks the French JSON next to the script.
    assert out["requested"] == "https://status.example.com/assets/status.fr.json"
    assert out["interval"] == 60_000
    assert (out["role"], out["live"]) == ("status", "polite")
    assert "API errors (Cause identifiée)" in out["shown"]
    assert "Prochaine mise à jour avant 10:40 CET" in out["shown"]
    assert out["link"] == "https://status.example.com/fr/#incident-1"
    assert out["afterDismiss"] == ""
    assert out["afterRefresh"] == ""  # remembered across refreshes
    assert "Correctif en cours" in out["afterNewUpdate"]  # a new update shows again
