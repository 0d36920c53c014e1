"""Caching for the LiberTEM GUI's static files: browser freshness and kept gzip bodies.

Two things make a warm load of the GUI fast, and both live here:

1. **Freshness for content-hashed assets.** LiberTEM's client is a Vite build: its JS, CSS,
   fonts and images are served at ``/assets/<name>-<hash>.<ext>`` where the hash (8 characters
   of Vite's base64url alphabet, LiberTEM 0.16.0) changes whenever the content does. libertem-
   server sends an ETag but no ``Cache-Control``, so a browser revalidates every asset at every
   load: one round trip each, which over a hub with real network latency is what the user waits
   for. Such a URL can never name other content, so the proxy marks it
   ``Cache-Control: private, max-age=31536000, immutable`` (RFC 9111 5.2.2.1, RFC 8246):
   *private* because the files sit behind the user's Jupyter login (a shared cache in front of
   a hub must not keep them), one year because that is the longest max-age that caches are
   required to honour, *immutable* so that even a reload does not revalidate them.
   ``index.html`` (which names the current hashes), the API and everything else keep the
   backend's headers: they must be revalidated so that a new LiberTEM version is seen at once.

2. **Kept gzip bodies.** The proxy compresses text responses (``compression``); the GUI's JS and
   CSS are 1.26 MB that compress to about 330 KB, costing tens of milliseconds of Jupyter CPU for
   every cold load by every user. A compressed body is kept per (path, ETag): the ETag is the
   backend's strong validator of exactly these bytes (tornado's is a hash of the body), so the
   same pair always means the same bytes, across users and restarts of libertem-server. Only
   GET 200 responses with a strong ETag, a ``Content-Length`` of at most ``MAX_ENTRY`` and a
   path outside ``api/`` qualify. Memory is bounded by ``MAX_TOTAL`` bytes of compressed data
   (least recently used entries go first); with LiberTEM 0.16.0 the whole GUI takes ~0.35 MB.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import OrderedDict
from collections.abc import Awaitable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp
    from multidict import CIMultiDictProxy

    from .base import ProxyHandlerBase

# Vite's default asset file names: "assets/[name]-[hash][extname]", the hash being 8 characters
# of base64url (LiberTEM 0.16.0: e.g. "assets/index-BuR9m0Yq.js", "LiberTEM%20logo-Cdk3jNwT.png").
HASHED_ASSET = re.compile(r"^/assets/[^/]+-[A-Za-z0-9_-]{8}\.[A-Za-z0-9]+$")
IMMUTABLE = "private, max-age=31536000, immutable"

MAX_ENTRY = 8 * 1024 * 1024  # largest uncompressed body kept (bytes)
MAX_TOTAL = 16 * 1024 * 1024  # all kept compressed bodies together (bytes)
GZIP_LEVEL = 6  # kept bodies are compressed once, so spend a little more than streaming does
THREAD_THRESHOLD = 64 * 1024  # compress larger bodies off the event loop (zlib drops the GIL)


def is_hashed_asset(upstream_path: str) -> bool:
    """Whether ``upstream_path`` (the raw path below the proxy prefix, with its leading ``/``,
    without the query) names a content-hashed GUI asset."""
    return HASHED_ASSET.match(upstream_path) is not None


def cache_control_for(
    method: str, upstream_path: str, status: int, backend_cache_control: str | None
) -> str | None:
    """The ``Cache-Control`` to add to a response, or None to leave the headers as they are.

    Only successful GET/HEAD answers for hashed assets, and only when the backend did not say
    anything about caching itself (its own ``Cache-Control`` always wins)."""
    if method not in ("GET", "HEAD") or status != 200 or backend_cache_control is not None:
        return None
    return IMMUTABLE if is_hashed_asset(upstream_path) else None


def keepable(method: str, upstream_path: str, etag: str | None, length: str | None) -> bool:
    """Whether a response about to be gzipped may be served from / stored in the body cache."""
    if method != "GET" or not etag or etag.startswith("W/") or upstream_path.startswith("/api/"):
        return False
    return length is not None and length.isascii() and length.isdigit() and int(length) <= MAX_ENTRY


def gzip_whole(body: bytes) -> bytes:
    """A complete gzip member (RFC 1952) of ``body``."""
    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return z.compress(body) + z.flush(zlib.Z_FINISH)


class GzipBodyCache:
    """Compressed bodies keyed by (upstream path, strong ETag), bounded by total size (LRU).

    One instance per Jupyter server (kept in the tornado settings). Not thread-safe: used from
    the event loop only.
    """

    def __init__(self, max_total: int = MAX_TOTAL) -> None:
        self.max_total = max_total
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str, etag: str) -> bytes | None:
        body = self._entries.get((path, etag))
        if body is None:
            self.misses += 1
            return None
        self._entries.move_to_end((path, etag))
        self.hits += 1
        return body

    def put(self, path: str, etag: str, gzipped: bytes) -> None:
        key = (path, etag)
        old = self._entries.pop(key, None)  # never keep an older body next to a newer one
        if old is not None:
            self.size -= len(old)
        if len(gzipped) > self.max_total:
            return
        self._entries[key] = gzipped
        self.size += len(gzipped)
        while self.size > self.max_total:
            _, dropped = self._entries.popitem(last=False)
            self.size -= len(dropped)

    async def gzipped(self, path: str, etag: str, body: bytes) -> bytes:
        """The compressed form of ``body`` (the backend's bytes for ``path`` with ``etag``),
        from the cache or compressed now and kept."""
        cached = self.get(path, etag)
        if cached is not None:
            return cached
        if len(body) > THREAD_THRESHOLD:
            gzipped = await asyncio.get_running_loop().run_in_executor(None, gzip_whole, body)
        else:
            gzipped = gzip_whole(body)
        self.put(path, etag, gzipped)
        return gzipped


SETTINGS_KEY = "libertem_proxy_gzip_cache"


def cache_in(settings: dict[str, object]) -> GzipBodyCache:
    """The body cache of this Jupyter server (created on first use in tornado's settings)."""
    cache = settings.get(SETTINGS_KEY)
    if not isinstance(cache, GzipBodyCache):
        cache = GzipBodyCache()
        settings[SETTINGS_KEY] = cache
    return cache


def apply(
    handler: ProxyHandlerBase, resp: aiohttp.ClientResponse, gzipping: bool
) -> Awaitable[bytes] | None:
    """The proxy's hook, called once the response headers are set and ``compression`` has
    decided whether to gzip: adds ``Cache-Control`` for hashed assets, and returns the
    compressed body to send (an awaitable) when it comes from, or goes into, the body cache;
    None when the body is to be relayed as usual."""
    method = handler.request.method or "GET"
    path = handler.upstream_path()
    headers = resp.headers
    control = cache_control_for(method, path, resp.status, headers.get("Cache-Control"))
    if control is not None:
        handler.set_header("Cache-Control", control)
    etag = headers.get("ETag")
    if not gzipping or not keepable(method, path, etag, headers.get("Content-Length")):
        return None
    if not _backend_allows_keeping(headers):
        return None
    assert etag is not None
    # an ETag identifies a representation within one URL, and the URL includes its query
    # (RFC 9110 8.8.3): two queries of one path may share an ETag and differ in body
    query = handler.request.query
    key = f"{path}?{query}" if query else path
    return _kept_body(cache_in(handler.settings), key, etag, resp)


def _backend_allows_keeping(headers: CIMultiDictProxy[str]) -> bool:
    """Not a body the backend said must not be stored (``no-store``), nor one that varies with
    request headers other than ``Accept-Encoding`` (the key has none of them)."""
    control = headers.get("Cache-Control", "").lower()
    if "no-store" in control:
        return False
    vary = {v.strip().lower() for v in ",".join(headers.getall("Vary", [])).split(",")}
    return vary <= {"", "accept-encoding"}


async def _kept_body(
    cache: GzipBodyCache, path: str, etag: str, resp: aiohttp.ClientResponse
) -> bytes:
    # the backend's body is always read (at most MAX_ENTRY bytes), so that its pooled
    # connection stays usable; on a hit it is dropped unused
    body = await resp.read()
    return await cache.gzipped(path, etag, body)
