"""Header and URL policy shared by the HTTP and websocket proxies.

What goes upstream: the browser's headers minus hop-by-hop headers and minus the user's Jupyter
credentials, plus our ``X-Api-Key`` and ``X-Forwarded-*``. What comes back: the backend's headers
minus hop-by-hop headers, with absolute paths (``Location``, ``Content-Location``, ``Refresh``,
cookie ``Path``) moved into our prefix. The lists and the prefixing convention are declared in
:mod:`.contract`; this module only applies them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote_plus, urlsplit

from tornado.httputil import HTTPHeaders

from . import contract

HOP_BY_HOP = contract.HOP_BY_HOP
_DROP_UPSTREAM = contract.REQUEST_REMOVED

# Websocket handshake headers that ws_proxy.upgrade_request writes itself (key, version,
# protocols), or never forwards: no extensions (frames are relayed as they are, so nothing may
# be negotiated that the bridge does not see) and no Origin (it was checked against Jupyter's
# rule; libertem-server would compare it with its own 127.0.0.1 address).
WS_HANDSHAKE = frozenset(
    {
        "origin",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)

_JUPYTER_COOKIE = contract.JUPYTER_COOKIE


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names listed in ``Connection`` are hop-by-hop too (RFC 9110, 7.6.1)."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


def as_utf8(value: str) -> str | None:
    """A header value as tornado decoded it (latin-1) -> the string aiohttp re-encodes to the
    same bytes (aiohttp encodes header strings as UTF-8); None if the bytes are not UTF-8.

    Without this, UTF-8 bytes in a cookie or a custom header reached the backend
    double-encoded (each byte taken as a latin-1 character, then encoded as UTF-8).
    """
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None


def filter_cookies(value: str, jupyter_cookie_names: set[str]) -> str:
    """Remove Jupyter's own cookies from a ``Cookie`` header, keep the backend's (unchanged)."""
    parts = value.split(";")
    kept = []
    for part in parts:
        name = part.split("=", 1)[0].strip()
        if not name or name in jupyter_cookie_names or _JUPYTER_COOKIE.match(name):
            continue
        kept.append(part.strip())
    if len(kept) == len(parts):
        return value  # nothing of Jupyter's in it: the browser's bytes, unchanged
    return "; ".join(kept)


def upstream_headers(
    request_headers: HTTPHeaders,
    *,
    token: str,
    prefix: str,
    proto: str,
    host: str,
    remote_ip: str | None,
    jupyter_cookie_names: set[str],
    drop: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """The header list to send to libertem-server for one browser request.

    Order and duplicates of the kept headers are preserved. ``prefix`` is accepted for the
    callers' sake but not sent: the backend is not told its prefix (see :mod:`.contract`).
    Values are returned as strings that aiohttp encodes back to the browser's exact bytes.
    """
    del prefix  # see the prefixing convention in contract.py
    items = list(request_headers.get_all())
    skip = HOP_BY_HOP | _DROP_UPSTREAM | drop | _connection_tokens(items)
    weak_if_range = any(n.lower() == "if-range" and v.strip().startswith("W/") for n, v in items)
    if weak_if_range:
        skip = skip | frozenset(contract.REQUEST_RANGE_DROPPED_ON_WEAK_IF_RANGE)
    out: list[tuple[str, str]] = []
    for name, value in items:
        lname = name.lower()
        if lname in skip:
            continue
        if lname == contract.REQUEST_FILTERED_COOKIE:
            filtered = filter_cookies(value, jupyter_cookie_names)
            kept = as_utf8(filtered) or ""
            if not kept and filtered:  # some cookie is not UTF-8: drop only that one
                kept = "; ".join(filter(None, (as_utf8(c) for c in filtered.split("; "))))
            if kept:
                out.append((name, kept))
            continue
        text = as_utf8(value)
        if text is not None:
            out.append((name, text))
    out.append(("X-Api-Key", token))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Forwarded-Host", host))
    if remote_ip:
        out.append(("X-Forwarded-For", remote_ip))
    return out


def strip_token_query(query: str) -> str:
    """Drop Jupyter's ``token`` parameters from a raw query, keep everything else raw.

    The name is compared after percent-decoding, as Jupyter decodes it when it reads the
    token: ``?%74oken=...`` logs the user in, so it must not reach the backend either.
    """
    if not query:
        return ""
    return "&".join(
        p
        for p in query.split("&")
        if unquote_plus(p.split("=", 1)[0]) not in contract.QUERY_REMOVED
    )


def rewrite_location(value: str, backend_port: int, prefix: str) -> str:
    """Move a backend redirect into our prefix; never let ``127.0.0.1:<port>`` reach the browser."""
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        host = (parts.hostname or "").lower()
        if host in ("127.0.0.1", "localhost") and parts.port == backend_port:
            path = parts.path or "/"
            rest = path + (f"?{parts.query}" if parts.query else "")
            rest += f"#{parts.fragment}" if parts.fragment else ""
            return prefix.rstrip("/") + rest
        return value  # a link to a really different site: leave it
    if value.startswith("/"):
        return prefix.rstrip("/") + value
    return value  # relative: resolves correctly against the proxied URL


_REFRESH_URL = re.compile(r"""^(\s*[0-9.]+\s*[;,]\s*url\s*=\s*)(['"]?)(.*?)(\2\s*)$""", re.I)


def rewrite_refresh(value: str, backend_port: int, prefix: str) -> str:
    """``Refresh: 5; url=/x`` -> ``Refresh: 5; url={prefix}x`` (HTML's refresh syntax)."""
    m = _REFRESH_URL.match(value)
    if m is None:
        return value  # no URL: reloads the page itself
    head, quote, url, tail = m.groups()
    return head + quote + rewrite_location(url, backend_port, prefix) + tail


def rewrite_set_cookie(value: str, prefix: str) -> str:
    """Scope a backend cookie to our prefix: ``Path=/x`` -> ``Path={prefix}x``, no ``Domain``.

    Edited as text, attribute by attribute: the name, value and every other attribute are
    kept byte for byte (a cookie library would re-quote values and reformat dates). A cookie
    without ``Path`` keeps none: its default path, the request's directory (RFC 6265 5.1.4),
    is already inside the prefix. A ``Path`` that does not start with ``/`` is ignored by
    browsers (same section), so it is left alone.
    """
    parts = value.split(";")
    out = [parts[0]]
    for attr in parts[1:]:
        name, eq, val = attr.partition("=")
        lname = name.strip().lower()
        if lname == "domain":
            continue  # the backend's domain is 127.0.0.1, never the browser's host
        if lname == "path" and eq and val.strip().startswith("/"):
            lead = val[: len(val) - len(val.lstrip())]
            attr = f"{name}={lead}{prefix.rstrip('/')}{val.lstrip()}"
        out.append(attr)
    return ";".join(out)


def response_headers(
    items: Iterable[tuple[str, str]], backend_port: int, prefix: str
) -> list[tuple[str, str]]:
    """The backend's response headers as they may reach the browser (see :mod:`.contract`)."""
    items = list(items)
    skip = HOP_BY_HOP | _connection_tokens(items)
    out: list[tuple[str, str]] = []
    for name, value in items:
        lname = name.lower()
        if lname in skip:
            continue
        if lname in ("location", "content-location"):
            value = rewrite_location(value, backend_port, prefix)
        elif lname == "refresh":
            value = rewrite_refresh(value, backend_port, prefix)
        elif lname == contract.RESPONSE_COOKIE:
            value = rewrite_set_cookie(value, prefix)
        out.append((name, value))
    return out
