"""The trio engine: sites, connections and stream sessions."""

from ._callbacks import SyncMode
from ._options import SiteOptions
from ._sender import END_RESULT, END_RESULTS
from ._site import Site, open_site, serve_site
from ._stats import ConnectionStats, StreamStats

__all__ = [
    "END_RESULT",
    "END_RESULTS",
    "ConnectionStats",
    "Site",
    "SiteOptions",
    "StreamStats",
    "SyncMode",
    "open_site",
    "serve_site",
]
