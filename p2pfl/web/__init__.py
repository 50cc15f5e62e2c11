"""The status page's files (HTML, CSS, JS), shipped as package data.

They are read once, into memory, when the status server starts: a request never
touches the disk (so never blocks the event loop), and only these names can be
served, so no path from a request ever reaches the filesystem.
"""

from __future__ import annotations

from importlib.resources import files

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}


def load_assets() -> dict[str, tuple[str, bytes]]:
    """File name -> (content type, bytes), for every page file in this package."""
    assets = {}
    for entry in files(__name__).iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = (CONTENT_TYPES[suffix], entry.read_bytes())
    return assets
