/*! incident-broadcaster status banner.
 * Include it on any page:
 *   <script src="https://status.example.com/banner.js" data-lang="fr" defer></script>
 * It reads status.<lang>.json next to this script and, while an incident is open,
 * shows a dismissible banner at the top of the page. The language is data-lang, else
 * the page's <html lang>, else the browser's; the page's default when none is offered.
 * No dependencies.
 */
(function () {
  "use strict";
  var CONFIG = {{ config|tojson }};
  var script = document.currentScript;
  if (!script || !script.src || !window.fetch) return;

  var base = new URL(".", script.src);
  // The app's own language first (data-lang, then <html lang>), then the browser's.
  var nav = window.navigator || {};
  var lang = pickLanguage(
    [script.getAttribute("data-lang"), document.documentElement.lang]
      .concat(nav.languages || [nav.language])
  );
  var source = new URL("status." + lang + ".json", base).href;
  // Per status page, so two banners from two pages do not share dismissals.
  var STORAGE_KEY = "incident-broadcaster:dismissed:" + base.href;
  var KEEP_DISMISSED = 50;
  var COLORS = {
    none: ["#ddf4ff", "#0a3069", "#0969da"],
    minor: ["#fff8c5", "#4d2d00", "#9a6700"],
    major: ["#fff1e5", "#5c1f00", "#bc4c00"],
    critical: ["#ffebe9", "#5c0011", "#cf222e"],
    maintenance: ["#ddf4ff", "#0a3069", "#0969da"]
  };
  var region = null;

  // The first wanted tag the page has, exactly or by its primary language.
  function pickLanguage(wanted) {
    for (var w = 0; w < wanted.length; w++) {
      if (!wanted[w]) continue;
      var tag = String(wanted[w]).toLowerCase().replace("_", "-");
      var primary = tag.split("-")[0];
      var i;
      for (i = 0; i < CONFIG.languages.length; i++) {
        if (CONFIG.languages[i].toLowerCase() === tag) return CONFIG.languages[i];
      }
      for (i = 0; i < CONFIG.languages.length; i++) {
        if (CONFIG.languages[i].toLowerCase() === primary) return CONFIG.languages[i];
      }
    }
    return CONFIG["default"];
  }

  function dismissed() {
    try {
      var value = JSON.parse(window.localStorage.getItem(STORAGE_KEY) || "[]");
      return Array.isArray(value) ? value : [];
    } catch (e) {
      return [];
    }
  }

  function dismiss(keys) {
    var kept = dismissed().concat(keys).slice(-KEEP_DISMISSED);
    try {
      window.localStorage.setItem(STORAGE_KEY, JSON.stringify(kept));
    } catch (e) {
      /* private mode: the banner is dismissed until the next refresh only */
    }
  }

  // A dismissal covers one update of one incident: the next update shows again.
  function keyOf(incident) {
    return incident.id + ":" + incident.update_id;
  }

  function ensureRegion() {
    // The live region exists before it has content, so screen readers announce it.
    if (!region) {
      region = document.createElement("div");
      region.setAttribute("role", "status");
      region.setAttribute("aria-live", "polite");
      region.className = "incident-broadcaster-banner";
      document.body.insertBefore(region, document.body.firstChild);
    }
    return region;
  }

  function clear() {
    if (!region) return;
    while (region.firstChild) region.removeChild(region.firstChild);
    region.removeAttribute("data-shown");
  }

  function show(data, incidents) {
    var keys = incidents.map(keyOf);
    var shown = keys.join(",");
    var el = ensureRegion();
    if (el.getAttribute("data-shown") === shown) return; // unchanged: do not re-announce
    clear();
    el.setAttribute("data-shown", shown);

    var first = incidents[0];
    var labels = data.labels || {};
    var palette = COLORS[first.kind === "maintenance" ? "maintenance" : first.impact] || COLORS.minor;
    var box = document.createElement("div");
    box.lang = data.language;
    box.style.cssText =
      "display:flex;align-items:flex-start;gap:.75rem;padding:.6rem 1rem;" +
      "font:15px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;" +
      "background:" + palette[0] + ";color:" + palette[1] + ";" +
      "border-bottom:3px solid " + palette[2] + ";";

    var text = document.createElement("p");
    text.style.cssText = "margin:0;flex:1;overflow-wrap:anywhere;";
    var title = document.createElement("strong");
    title.textContent = first.title + " (" + first.status_label + ")";
    text.appendChild(title);
    var body = " " + (first.summary || "");
    if (first.next_update_by && labels.next_update_by) {
      body += " " + labels.next_update_by + " " + first.next_update_by + ".";
    }
    if (incidents.length > 1) {
      body += " (+" + (incidents.length - 1) + " " + (labels.more_incidents || "") + ")";
    }
    text.appendChild(document.createTextNode(body + " "));
    var link = document.createElement("a");
    link.href = first.url || new URL(first.path, base).href;
    link.textContent = labels.details || "Details";
    link.style.color = "inherit";
    text.appendChild(link);

    var close = document.createElement("button");
    close.type = "button";
    close.textContent = "\u00d7";
    close.setAttribute("aria-label", labels.dismiss || "Dismiss");
    close.title = labels.dismiss || "Dismiss";
    close.style.cssText =
      "border:0;background:transparent;color:inherit;font-size:1.4em;line-height:1;" +
      "cursor:pointer;padding:0 .25rem;";
    close.addEventListener("click", function () {
      dismiss(keys);
      clear();
    });

    box.appendChild(text);
    box.appendChild(close);
    el.appendChild(box);
  }

  function render(data) {
    var gone = dismissed();
    var incidents = (data.incidents || []).filter(function (incident) {
      return gone.indexOf(keyOf(incident)) < 0;
    });
    if (incidents.length) show(data, incidents);
    else clear();
  }

  function refresh() {
    if (document.hidden) return;
    fetch(source, { cache: "no-cache", credentials: "omit" })
      .then(function (response) {
        if (!response.ok) throw new Error("status " + response.status);
        return response.json();
      })
      .then(render)
      .catch(function () {
        /* The status page host may be unreachable too: keep what is shown. */
      });
  }

  function start() {
    ensureRegion();
    refresh();
    window.setInterval(refresh, CONFIG.refresh * 1000);
    document.addEventListener("visibilitychange", refresh);
  }

  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
