"""Header and URL policy shared by the HTTP and websocket proxies.

What goes upstream: the browser's headers minus hop-by-hop headers and minus the user's Jupyter
credentials, plus our ``X-Api-Key`` and ``X-Forwarded-*``. What comes back: the backend's headers
minus hop-by-hop headers, with ``Location`` and cookie paths moved into our prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders

HOP_BY_HOP = frozenset(
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

# Never forwarded upstream: credentials of the Jupyter user (the backend has its own token) and
# anything that would let the browser pick the backend's key or pose as a proxy.
_DROP_UPSTREAM = frozenset(
    {
        "host",
        "authorization",
        "cookie",
        "x-api-key",
        "x-xsrftoken",
        "x-csrftoken",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-prefix",
        "x-real-ip",
        "forwarded",
    }
)

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

_JUPYTER_COOKIE = re.compile(r"^(_xsrf|jupyterhub-.*|username-.*)$")


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names listed in ``Connection`` are hop-by-hop too (RFC 9110, 7.6.1)."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            names.update(t.strip().lower() for t in value.split(",") if t.strip())
    return names


def filter_cookies(value: str, jupyter_cookie_names: set[str]) -> str:
    """Remove Jupyter's own cookies from a ``Cookie`` header, keep the backend's."""
    kept = []
    for part in value.split(";"):
        name = part.split("=", 1)[0].strip()
        if not name or name in jupyter_cookie_names or _JUPYTER_COOKIE.match(name):
            continue
        kept.append(part.strip())
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
    """The header list to send to libertem-server for one browser request."""
    items = list(request_headers.get_all())
    skip = HOP_BY_HOP | _DROP_UPSTREAM | drop | _connection_tokens(items)
    out: list[tuple[str, str]] = []
    for name, value in items:
        lname = name.lower()
        if lname == "cookie":
            kept = filter_cookies(value, jupyter_cookie_names)
            if kept:
                out.append(("Cookie", kept))
            continue
        if lname in skip:
            continue
        out.append((name, value))
    out.append(("X-Api-Key", token))
    out.append(("X-Forwarded-Prefix", prefix.rstrip("/")))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Forwarded-Host", host))
    if remote_ip:
        out.append(("X-Forwarded-For", remote_ip))
    return out


def strip_token_query(query: str) -> str:
    """Drop ``token=`` parameters (Jupyter's credential) from a raw query, keep the rest raw."""
    if not query:
        return ""
    return "&".join(p for p in query.split("&") if p.split("=", 1)[0] != "token")


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


def rewrite_set_cookie(value: str, prefix: str) -> str:
    """Scope a backend cookie to our prefix (``Path=/x`` -> ``Path={prefix}x``)."""
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(value)
    except Exception:  # unparsable: pass it on unchanged rather than lose it
        return value
    if not cookie:
        return value
    for morsel in cookie.values():
        path = morsel["path"] or "/"
        morsel["path"] = prefix.rstrip("/") + (path if path.startswith("/") else "/" + path)
        if morsel["domain"]:
            morsel["domain"] = ""
    return "; ".join(m.OutputString() for m in cookie.values())


def response_headers(
    items: Iterable[tuple[str, str]], backend_port: int, prefix: str
) -> list[tuple[str, str]]:
    """The backend's response headers as they may reach the browser."""
    items = list(items)
    skip = HOP_BY_HOP | _connection_tokens(items)
    out: list[tuple[str, str]] = []
    for name, value in items:
        lname = name.lower()
        if lname in skip:
            continue
        if lname == "location":
            value = rewrite_location(value, backend_port, prefix)
        elif lname == "set-cookie":
            value = rewrite_set_cookie(value, prefix)
        out.append((name, value))
    return out
