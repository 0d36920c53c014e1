"""The cross-site rule for proxied state-changing requests.

The LiberTEM GUI sends no ``_xsrf`` token, so Jupyter's XSRF check cannot be applied to proxied
requests; yet the proxy adds the backend's API key, so a forged cross-site ``DELETE`` with the
user's cookie would be honoured. Instead, a cookie-authenticated POST/PUT/PATCH/DELETE must
carry an ``Origin`` (or, failing that, a ``Referer``) that Jupyter itself would accept: the same
host, or one allowed by ``allow_origin`` / ``allow_origin_pat``. ``Origin: null`` (sandboxed
frames, privacy redirects) counts as foreign. Token-authenticated requests (scripts) are exempt,
as in Jupyter's own rule.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL, lower case; None if it has no host."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def is_allowed_origin(
    origin: str | None,
    host: str | None,
    allow_origin: str = "",
    allow_origin_pat: str | re.Pattern[str] | None = None,
) -> bool:
    """Jupyter's ``check_origin`` rule, without its "no Origin is fine" escape."""
    if allow_origin == "*":
        return True
    if not origin or origin == "null" or not host:
        return False
    if urlsplit(origin).netloc == host.lower():
        return True
    if allow_origin:
        return allow_origin == origin
    if allow_origin_pat:
        pat = (
            allow_origin_pat
            if isinstance(allow_origin_pat, re.Pattern)
            else re.compile(allow_origin_pat)
        )
        return bool(pat.match(origin))
    return False


def cross_site_reason(
    method: str,
    headers: dict[str, str] | object,
    host: str | None,
    allow_origin: str = "",
    allow_origin_pat: str | re.Pattern[str] | None = None,
) -> str | None:
    """Why a request must be refused as cross-site, or None if it may pass."""
    if method.upper() not in UNSAFE_METHODS:
        return None
    get = headers.get  # type: ignore[attr-defined]
    origin = get("Origin")
    if origin is None:
        referer = get("Referer")
        if not referer:
            return f"{method} needs an Origin or Referer header from this Jupyter server's pages"
        origin = origin_of(referer)
    else:
        origin = origin.strip().lower()
    if is_allowed_origin(origin, host, allow_origin, allow_origin_pat):
        return None
    return f"Blocking cross-site {method} from origin {origin!s}"
