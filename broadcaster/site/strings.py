"""The status page's own words (not the incident texts), per language.

English is complete; another language may translate only some keys, and anything it
leaves out (or a language not listed at all) is said in English. A regional tag such
as `fr-CA` uses `fr`.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["LANGUAGE_NAMES", "language_name", "strings_for"]

_EN: dict[str, str] = {
    # page furniture
    "skip_to_content": "Skip to content",
    "colon": ":",
    "languages": "Language",
    "overall_heading": "Current status",
    "components_heading": "Components",
    "active_heading": "Active incidents",
    "maintenance_heading": "Scheduled maintenance",
    "resolved_heading": "Recently resolved",
    "no_active": "No incidents right now.",
    "no_resolved": "No incidents in the past 14 days.",
    "affected": "Affected",
    "impact": "Impact",
    "started": "Started",
    "resolved_at": "Resolved",
    "window": "Window",
    "window_to": "to",
    "updates": "Updates",
    "show_updates": "Show updates",
    "next_update_by": "Next update by",
    "last_updated": "Last updated",
    "subscribe_atom": "Atom feed",
    "subscribe_updates": "Get updates by email or SMS",
    "status_json": "Status JSON",
    "details": "Details",
    "dismiss": "Dismiss",
    "more_incidents": "more",
    # overall descriptions, by Statuspage indicator (and maintenance)
    "overall_none": "All systems operational",
    "overall_minor": "Minor service outage",
    "overall_major": "Partial system outage",
    "overall_critical": "Major service outage",
    "overall_maintenance": "Service under maintenance",
    # component states
    "state_operational": "Operational",
    "state_degraded_performance": "Degraded performance",
    "state_partial_outage": "Partial outage",
    "state_major_outage": "Major outage",
    "state_under_maintenance": "Under maintenance",
    # incident and maintenance statuses
    "status_investigating": "Investigating",
    "status_identified": "Identified",
    "status_monitoring": "Monitoring",
    "status_resolved": "Resolved",
    "status_scheduled": "Scheduled",
    "status_in_progress": "In progress",
    "status_completed": "Completed",
    # impacts
    "impact_none": "None",
    "impact_minor": "Minor",
    "impact_major": "Major",
    "impact_critical": "Critical",
    # dates: {day} {month} {year} {time}
    "date_format": "{day} {month} {year}, {time}",
    "months": "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
}

_FR: dict[str, str] = {
    "skip_to_content": "Aller au contenu",
    "colon": "\u00a0:",  # French puts a (no-break) space before a colon
    "languages": "Langue",
    "overall_heading": "État actuel",
    "components_heading": "Composants",
    "active_heading": "Incidents en cours",
    "maintenance_heading": "Maintenances planifiées",
    "resolved_heading": "Résolus récemment",
    "no_active": "Aucun incident en ce moment.",
    "no_resolved": "Aucun incident ces 14 derniers jours.",
    "affected": "Concerné",
    "impact": "Impact",
    "started": "Début",
    "resolved_at": "Résolu",
    "window": "Créneau",
    "window_to": "au",
    "updates": "Mises à jour",
    "show_updates": "Voir les mises à jour",
    "next_update_by": "Prochaine mise à jour avant",
    "last_updated": "Dernière mise à jour",
    "subscribe_atom": "Flux Atom",
    "subscribe_updates": "Recevoir les mises à jour par e-mail ou SMS",
    "status_json": "État en JSON",
    "details": "Détails",
    "dismiss": "Fermer",
    "more_incidents": "autre(s)",
    "overall_none": "Tous les systèmes sont opérationnels",
    "overall_minor": "Perturbation mineure du service",
    "overall_major": "Panne partielle du système",
    "overall_critical": "Panne majeure du service",
    "overall_maintenance": "Service en maintenance",
    "state_operational": "Opérationnel",
    "state_degraded_performance": "Performances dégradées",
    "state_partial_outage": "Panne partielle",
    "state_major_outage": "Panne majeure",
    "state_under_maintenance": "En maintenance",
    "status_investigating": "Enquête en cours",
    "status_identified": "Cause identifiée",
    "status_monitoring": "Sous surveillance",
    "status_resolved": "Résolu",
    "status_scheduled": "Planifiée",
    "status_in_progress": "En cours",
    "status_completed": "Terminée",
    "impact_none": "Aucun",
    "impact_minor": "Mineur",
    "impact_major": "Majeur",
    "impact_critical": "Critique",
    "date_format": "{day} {month} {year} à {time}",
    "months": "janv. févr. mars avr. mai juin juil. août sept. oct. nov. déc.",
}

_STRINGS: dict[str, dict[str, str]] = {"en": _EN, "fr": _FR}

LANGUAGE_NAMES: Mapping[str, str] = {
    "ar": "العربية",
    "de": "Deutsch",
    "en": "English",
    "es": "Español",
    "fr": "Français",
    "it": "Italiano",
    "ja": "日本語",
    "nl": "Nederlands",
    "pl": "Polski",
    "pt": "Português",
    "ru": "Русский",
    "sv": "Svenska",
    "uk": "Українська",
    "zh": "中文",
}
"""Each language's name for itself, as a language switch shows it."""


def _primary(language: str) -> str:
    return language.replace("_", "-").split("-", 1)[0].lower()


def strings_for(language: str) -> dict[str, str]:
    """The UI strings for `language`, English wherever it has no translation."""
    translated = _STRINGS.get(language) or _STRINGS.get(_primary(language)) or {}
    return {**_EN, **translated}


def language_name(language: str) -> str:
    """The language's own name (`Français`), or its code when we do not know it."""
    return LANGUAGE_NAMES.get(language) or LANGUAGE_NAMES.get(_primary(language)) or language
