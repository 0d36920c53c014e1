"""The proxy's HTTP contract: the complete list of changes it makes to a request or a response.

Everything not listed here passes unchanged: the method, the raw (still percent-encoded) path
below the prefix, the query, every other header name, value and order, header bytes outside
ASCII, the status code and reason, and every body byte. ``headers.py``, ``compression.py`` and
``http_proxy.py`` take their lists from this module, and the differential test
(``tests/test_transparency.py``) compares an exchange made directly with the backend and the same
exchange made through Jupyter, normalising them *only* through the names declared here. A change
the code makes that is not declared here makes that test fail. The same list is in the docs
(``docs/http-contract.rst``).

Prefixing convention (one, held everywhere): the backend is NOT told its public prefix (no
``X-Forwarded-Prefix``), and the proxy moves every absolute path the backend sends into the
prefix: ``Location``, ``Content-Location``, the ``url=`` of ``Refresh`` and the ``Path`` of
``Set-Cookie``. Why this one: libertem-server (0.16.0) ignores ``X-Forwarded-Prefix`` and builds
its links relative to the page, so the header bought nothing; and a backend that honoured it
(Flask's ProxyFix, Starlette's ``root_path``) would have had its paths prefixed twice. Rewriting
on the way out works for any backend that thinks it is served at ``/``, which is what the
proxy's upstream URL tells it.
"""

from __future__ import annotations

import re
from typing import Final

# --- request: browser -> backend -------------------------------------------------------------

#: Hop-by-hop headers (RFC 9110 7.6.1; RFC 9112 for Transfer-Encoding/TE): they describe one
#: connection, not the message. Names listed in ``Connection`` are removed too. Both directions.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Request headers never forwarded. ``host``: the upstream connection names its own host.
#: ``authorization``/``x-xsrftoken``/``x-csrftoken``: the Jupyter user's credentials (the
#: backend has its own key). ``x-api-key``: the browser must not choose the backend's key.
#: ``x-forwarded-*``/``forwarded``/``x-real-ip``: the browser must not pose as a proxy (the
#: proxy sets its own, below). ``expect``: Jupyter (tornado) already answered ``100 Continue``
#: to the browser; forwarded, a backend that never sends 100 (or answers at once) would leave
#: the upload hanging (RFC 9110 10.1.1 lets a proxy answer it itself).
REQUEST_REMOVED: Final = frozenset(
    {
        "host",
        "authorization",
        "x-api-key",
        "x-xsrftoken",
        "x-csrftoken",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-prefix",
        "x-real-ip",
        "forwarded",
        "expect",
    }
)

#: ``Cookie`` is filtered, not removed: Jupyter's own cookies (its login cookie, ``_xsrf``,
#: ``username-*``, ``jupyterhub-*``) are taken out, the backend's cookies pass unchanged.
REQUEST_FILTERED_COOKIE: Final = "cookie"

#: Jupyter's own cookies: never forwarded in ``Cookie``; and the one Jupyter sets itself (its
#: login cookie, after a ``?token=`` login) appears in ``Set-Cookie`` next to the backend's.
JUPYTER_COOKIE: Final = re.compile(r"^(_xsrf|jupyterhub-.*|username-.*)$")

#: ``Host`` is the upstream connection's own (``127.0.0.1:<port>``): replaced, not removed.
REQUEST_REPLACED: Final = frozenset({"host"})

#: Request headers the proxy adds: the backend's key, and who the browser talked to.
REQUEST_ADDED: Final = ("x-api-key", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-for")

#: A request without a body (no ``Content-Length``, no ``Transfer-Encoding``) whose method is
#: not GET/HEAD/OPTIONS/TRACE reaches the backend with ``Content-Length: 0``: the upstream
#: client (aiohttp 3.x) always adds it, and it describes the same empty body (RFC 9110 8.6
#: recommends it for methods that define content).
REQUEST_EMPTY_BODY_LENGTH: Final = ("content-length", "0")
REQUEST_EMPTY_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: Query parameters removed: Jupyter's ``token`` (compared after percent-decoding the name,
#: as Jupyter itself decodes it: ``%74oken`` is ``token``).
QUERY_REMOVED: Final = frozenset({"token"})

#: ``If-Range`` holding a weak entity tag can never match (RFC 9110 13.1.5), so the answer is
#: the full representation: the proxy removes ``Range`` and ``If-Range`` in that case (the weak
#: tags are the ones it made for gzipped bodies, see below).
REQUEST_RANGE_DROPPED_ON_WEAK_IF_RANGE: Final = ("range", "if-range")

#: Request header values that are not valid UTF-8 cannot be sent by the upstream client
#: (aiohttp encodes header strings as UTF-8): such a header is not forwarded (a ``Cookie`` loses
#: only the offending cookie). Valid UTF-8 passes byte for byte.
REQUEST_NON_UTF8_DROPPED: Final = True

# --- response: backend -> browser ------------------------------------------------------------

#: Absolute paths moved into the prefix (see the module docstring). A URL to the backend's own
#: ``127.0.0.1:<port>`` becomes a path in the prefix; other sites and relative paths are kept.
RESPONSE_PREFIXED: Final = ("location", "content-location", "refresh")
#: ``Set-Cookie``: ``Path`` moved into the prefix (a missing Path becomes the prefix), and
#: ``Domain`` removed (the backend's host is 127.0.0.1, not the browser's).
RESPONSE_COOKIE: Final = "set-cookie"

#: Headers Jupyter puts on every answer (``JupyterHandler.set_default_headers``). A backend
#: header of the same name is sent next to Jupyter's, never instead of it (both then apply).
SECURITY_HEADERS: Final = frozenset({"content-security-policy", "x-content-type-options"})
#: Headers Jupyter adds on every answer that the backend did not send (informational, or the
#: CORS headers of ``allow_origin``): present through the proxy, absent directly.
JUPYTER_ADDED: Final = frozenset(
    {
        "server",
        "date",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-headers",
        "access-control-expose-headers",
        "x-jupyter-server",
    }
)
#: The proxy's own framing: it sends ``Content-Length`` or chunked encoding as it sees fit
#: (the body is the same), and ``Connection: close`` when it answers before reading the body.
RESPONSE_FRAMING: Final = frozenset({"content-length", "transfer-encoding", "connection"})

#: gzip: a 200 whose type is in :data:`COMPRESSIBLE`, with no ``Content-Encoding``, at least
#: :data:`GZIP_MIN_LENGTH` bytes (or of unknown length) and no ``Cache-Control: no-transform``
#: (in the request or the response, RFC 9111 5.2.1.6/5.2.2.6) is sent gzipped to a browser
#: that accepts gzip. Its consequences, all of them:
#:
#: - ``Content-Encoding: gzip`` added, ``Content-Length`` removed (chunked instead), also on a
#:   HEAD of such a resource (the length of the gzipped body is not known without making it);
#: - ``Vary: Accept-Encoding`` added to every such 200, gzipped or not;
#: - a strong ``ETag`` becomes weak (``W/``): the gzipped body is a different representation
#:   (RFC 9110 8.8.1); a 304 answering an ``If-None-Match`` that holds the weak tag gets the
#:   weak tag and the ``Vary`` too, as its 200 did;
#: - ``Accept-Ranges`` removed: byte ranges of the gzipped body cannot be served.
COMPRESSIBLE: Final = frozenset(
    {
        "text/html",
        "text/css",
        "text/plain",
        "text/javascript",
        "application/javascript",
        "application/x-javascript",
        "application/json",
        "image/svg+xml",
    }
)
GZIP_MIN_LENGTH: Final = 1024  # below this, gzip's own header costs more than it saves
GZIP_ADDED: Final = ("content-encoding", "vary")
GZIP_REMOVED: Final = ("content-length", "accept-ranges")
GZIP_WEAKENED: Final = "etag"

#: Freshness for content-hashed GUI assets (``asset_cache``, issue 17): a GET/HEAD 200 for
#: ``/assets/<name>-<hash>.<ext>`` without a ``Cache-Control`` of the backend's gets
#: ``Cache-Control: private, max-age=31536000, immutable``; the backend's own always wins.
#: (The differential suite's paths are not hashed assets; tests/test_asset_cache.py holds this.)
HASHED_ASSET_CACHE_CONTROL: Final = "cache-control"

#: Statuses that carry no body (RFC 9110 6.4.1): a ``Content-Length`` on them describes the
#: resource, not the message; it passes on a 304 and is dropped on 204 and 1xx. Interim 1xx
#: answers of the backend are not relayed (Jupyter sends its own ``100 Continue``).
NO_BODY_STATUSES: Final = frozenset({204, 304})

#: Errors the proxy answers itself (never relayed as the backend's): 403 for a cross-site
#: unsafe request or a missing login, 413 for a body over ``max_body_size``, 502/503/504 with a
#: page or JSON naming the problem when LiberTEM cannot answer. A response the backend breaks
#: off mid-body is broken off to the browser too (never completed as if it were whole).
PROXY_STATUSES: Final = frozenset({403, 413, 502, 503, 504})


# --- the one answer edited on purpose (adaptations.py) -----------------------------------------

#: ``GET`` of this path: ``config.localCores`` and ``config.devices.cpus`` of the 200 are set to
#: the ``cpus`` figure (LiberTEM 0.16 proposes the host's physical cores, see sizing.py).
CONFIG_PATH: Final = "/api/config/"

#: Removed from that rewritten answer: they describe LiberTEM's own body.
CONFIG_ANSWER_REMOVED: Final = frozenset({"content-length", "etag", "content-md5", "digest"})

#: Not forwarded with that request: they compare LiberTEM's validators of the unrewritten body,
#: so its 304 would confirm a copy cached before the rewrite (or with another ``cpus``).
CONFIG_REQUEST_REMOVED: Final = frozenset(
    {"if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range"}
)
