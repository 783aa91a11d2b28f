"""The public side: status page, banner JSON and script, Atom feeds, Statuspage JSON.

Rendered once from a `PublicState` snapshot, so it can be published as static files
to a host that does not share the failing infrastructure, or served live.
"""

from broadcaster.site.render import render_site, write_site
from broadcaster.site.state import (
    Indicator,
    OverallStatus,
    PublicIncident,
    PublicState,
    PublicUpdate,
)

__all__ = [
    "Indicator",
    "OverallStatus",
    "PublicIncident",
    "PublicState",
    "PublicUpdate",
    "render_site",
    "write_site",
]
