"""The differential transparency suite: the same exchange made directly with the raw backend and
through Jupyter (plain, and Jupyter's own TLS) must be equal modulo the declared changes.

``hypothesis`` generates the exchange: method, request body framing (none, Content-Length,
chunked, ``Expect: 100-continue``), request headers (conditionals, ranges, no-transform, gzip,
non-ASCII bytes, duplicates, cookies), response status (incl. an interim 100, 204, 206, 3xx,
304, 4xx/5xx, early answers before the body is read), response framing (none, Content-Length,
chunked, close-delimited) and response headers (ETags, Cache-Control, Vary, Set-Cookie
variants, Location forms, non-ASCII bytes, duplicates). :func:`normalise_request` and
:func:`normalise_response` remove or undo exactly what :mod:`libertem_jupyter_proxy.contract`
declares, nothing else: a change the proxy makes that the contract does not list fails here.

Bounded: ``max_examples`` per transport; the cases found on the way are kept as ordinary tests
in ``tests/test_http_regressions.py``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libertem_jupyter_proxy import contract

from . import jupyter_rig, scripts
from .jupyter_rig import PREFIX, Rig
from .raw_backend import pattern
from .raw_http import RawResponse, chunked

rig = jupyter_rig.rig  # the fixtures
tls_files = jupyter_rig.tls_files

MAX_EXAMPLES = int(os.environ.get("LJP_TRANSPARENCY_EXAMPLES", "100"))  # per transport (plain, TLS)

REASONS = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Exchange:
    method: str
    path: str
    req_headers: list[tuple[str, bytes]]
    req_body: bytes
    req_framing: str  # none, length, chunked
    req_pieces: int
    expect: bool
    early: bool  # the backend answers before reading the body
    interim: bool  # the backend sends a 100 before its answer
    status: int
    resp_headers: list[tuple[str, bytes]]
    resp_body: bytes
    resp_framing: str  # none, length, chunked, close
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # bodies shortened: a failing case must stay readable
        def short(b: bytes) -> str:
            return f"<{len(b)} bytes {b[:16]!r}...>" if len(b) > 32 else repr(b)

        fields = {k: v for k, v in self.__dict__.items() if k not in ("req_body", "resp_body")}
        body = f"req_body={short(self.req_body)}, resp_body={short(self.resp_body)}"
        return f"Exchange({fields}, {body})"


NON_ASCII = ["café".encode(), "Grüße ☃".encode(), b"plain"]
COOKIES = [b"a=1", b"a=1; b=2", b'n="x y"', "u=é".encode()]
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    method = draw(st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]))
    path = draw(st.sampled_from(["x", "api/a%20b/", "assets/LiberTEM%20logo.png", "q?a=1&b=%2F"]))
    h: list[tuple[str, bytes]] = []
    if draw(st.booleans()):
        h.append(("Accept-Encoding", draw(st.sampled_from([b"gzip", b"gzip, br", b"gzip;q=0"]))))
    if draw(st.booleans()):
        h.append(("If-None-Match", draw(st.sampled_from([b'"v1"', b'W/"v1"', b"*"]))))
    if draw(st.booleans()):
        h.append(("Range", b"bytes=0-9"))
        if draw(st.booleans()):
            h.append(("If-Range", draw(st.sampled_from([b'"v1"', b'W/"v1"']))))
    if draw(st.booleans()):
        h.append(("Cache-Control", draw(st.sampled_from([b"no-cache", b"no-transform"]))))
    for _ in range(draw(st.integers(0, 2))):
        h.append(("X-Dup", draw(st.sampled_from(NON_ASCII))))
    if draw(st.booleans()):
        h.append(("Cookie", draw(st.sampled_from(COOKIES))))

    req_framing = "none"
    body = b""
    if method not in ("GET", "HEAD", "OPTIONS") or draw(st.integers(0, 4)) == 0:
        req_framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if req_framing != "none":
        body = draw(st.binary(min_size=0, max_size=512)) * draw(st.sampled_from([1, 300]))
    expect = req_framing == "length" and bool(body) and draw(st.booleans())
    early = req_framing != "none" and bool(body) and draw(st.integers(0, 3)) == 0

    status = draw(st.sampled_from(sorted(s for s in REASONS if s != 100)))
    interim = not early and draw(st.integers(0, 5)) == 0
    no_body = method == "HEAD" or status in (204, 304)
    rh: list[tuple[str, bytes]] = []
    ctype = draw(
        st.sampled_from(
            [b"text/html", b"application/json", b"application/octet-stream", b"text/css"]
        )
    )
    if status not in (204, 304) or draw(st.booleans()):
        rh.append(("Content-Type", ctype))
    if draw(st.booleans()):
        rh.append(("ETag", draw(st.sampled_from([b'"v1"', b'W/"v1"']))))
    if draw(st.booleans()):
        rh.append(
            (
                "Cache-Control",
                draw(st.sampled_from([b"no-store", b"public, max-age=60", b"no-transform"])),
            )
        )
    if draw(st.booleans()):
        rh.append(("Vary", draw(st.sampled_from([b"Cookie", b"Accept-Encoding"]))))
    if draw(st.booleans()):
        rh.append(("Accept-Ranges", b"bytes"))
    for _ in range(draw(st.integers(0, 2))):
        rh.append(
            (
                "Set-Cookie",
                draw(
                    st.sampled_from(
                        [
                            b"sid=1; Path=/; HttpOnly",
                            b"s2=x; Path=/api/; SameSite=Lax",
                            b"nopath=1",
                            b'q="a b"; Expires=Wed, 09 Jun 2027 10:18:14 GMT; Path=/a',
                            b"d=1; Domain=127.0.0.1; Path=/",
                        ]
                    )
                ),
            )
        )
    if (300 <= status < 400 and status != 304) or draw(st.integers(0, 5)) == 0:
        rh.append(
            (
                "Location",
                draw(
                    st.sampled_from(
                        [b"/login?next=%2Fa", b"relative/x", b"https://example.org/x", b"/"]
                    )
                ),
            )
        )
    if draw(st.integers(0, 5)) == 0:
        rh.append(("Content-Location", b"/doc/1"))
    if draw(st.integers(0, 5)) == 0:
        rh.append(("Refresh", draw(st.sampled_from([b"5", b"0; url=/next"]))))
    for _ in range(draw(st.integers(0, 2))):
        rh.append(("X-Back", draw(st.sampled_from(NON_ASCII))))

    resp_body = b""
    body_seed = (0, 0, False)
    framing = "none"
    if not no_body:
        # made by the backend from a seed (scripts travel in a header, which has a size limit)
        body_seed = (
            draw(st.integers(0, 2**16)),
            draw(st.sampled_from([0, 1, 100, 1023, 1024, 5000, 300_000])),
            not ctype.endswith(b"octet-stream"),
        )
        resp_body = pattern(*body_seed)
        framing = draw(st.sampled_from(["length", "chunked", "close"]))
    elif draw(st.booleans()):
        framing = "length-only"  # a Content-Length that describes the resource, no body
    return Exchange(
        method,
        path,
        h,
        body,
        req_framing,
        draw(st.integers(1, 4)),
        expect,
        early,
        interim,
        status,
        rh,
        resp_body,
        framing,
        {"length_only": draw(st.integers(0, 5000)), "body_seed": body_seed},
    )


def backend_steps(ex: Exchange) -> list[list[Any]]:
    """The raw backend's script for ``ex`` (the same bytes whichever way the request came)."""
    headers: list[tuple[str, bytes]] = list(ex.resp_headers)
    if ex.resp_framing == "length":
        headers.append(("Content-Length", str(len(ex.resp_body)).encode()))
    elif ex.resp_framing == "chunked":
        headers.append(("Transfer-Encoding", b"chunked"))
    elif ex.resp_framing == "length-only":
        headers.append(("Content-Length", str(ex.extra["length_only"]).encode()))
    if ex.resp_framing == "close" or ex.early:
        headers.append(("Connection", b"close"))
    head = scripts.response_head(f"{ex.status} {REASONS[ex.status]}", headers)  # type: ignore[arg-type]
    steps: list[list[Any]] = []
    if not ex.early:
        if ex.interim:
            steps.append(scripts.send(b"HTTP/1.1 100 Continue\r\n\r\n"))
        steps.append(["read_body"])
    steps.append(scripts.send(head))
    if ex.method != "HEAD" and ex.status not in (204, 304) and ex.resp_framing != "length-only":
        seed, size, text = ex.extra["body_seed"]
        framing = "chunked" if ex.resp_framing == "chunked" else "length"
        steps.append(["body", seed, size, 65536, 0, framing, text])
    if ex.early:
        steps.append(["linger", 5])
    elif ex.resp_framing == "close":
        steps.append(["close"])
    return steps


def request_parts(ex: Exchange, script_id: str) -> tuple[list[tuple[str, Any]], list[bytes]]:
    h: list[tuple[str, Any]] = [scripts.header(backend_steps(ex), script_id), *ex.req_headers]
    pieces: list[bytes] = []
    if ex.req_framing == "length":
        h.append(("Content-Length", str(len(ex.req_body))))
        n = ex.req_pieces
        step = max(1, -(-len(ex.req_body) // n))
        pieces = [ex.req_body[i : i + step] for i in range(0, len(ex.req_body), step)]
    elif ex.req_framing == "chunked":
        h.append(("Transfer-Encoding", "chunked"))
        step = max(1, -(-len(ex.req_body) // ex.req_pieces))
        pieces = chunked([ex.req_body[i : i + step] for i in range(0, len(ex.req_body), step)])
    if ex.expect:
        h.append(("Expect", "100-continue"))
    return h, pieces


# --- normalisation: only what contract.py declares ---------------------------------------------


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    return {
        t.strip().lower()
        for n, v in headers
        if n.lower() == "connection"
        for t in v.split(",")
        if t.strip()
    }


def normalise_request(record: dict[str, Any], proxied: bool) -> dict[str, Any]:
    """What the backend received, minus the declared request changes: what the proxy removes
    is taken out of the direct request; what it adds (each exactly once) out of the proxied."""
    headers = [(n, v) for n, v in record["headers"]]
    drop = (
        contract.HOP_BY_HOP
        | contract.REQUEST_REPLACED
        | _connection_tokens(headers)
        | {"x-raw-script"}  # the same on both legs, and long: compared via the record id
    )
    if proxied:
        names = [n.lower() for n, _ in headers]
        for added in contract.REQUEST_ADDED:
            assert names.count(added) == 1, (added, names)
        drop |= frozenset(contract.REQUEST_ADDED)
    else:
        drop |= contract.REQUEST_REMOVED
    if any(n.lower() == "if-range" and v.startswith("W/") for n, v in headers):
        drop |= frozenset(contract.REQUEST_RANGE_DROPPED_ON_WEAK_IF_RANGE)
    kept = [(n.lower(), v) for n, v in headers if n.lower() not in drop]
    if (
        record["method"] in contract.REQUEST_EMPTY_BODY_METHODS
        and kept.count(contract.REQUEST_EMPTY_BODY_LENGTH) == 1
        and record.get("body_len") in (0, None)
    ):
        kept.remove(contract.REQUEST_EMPTY_BODY_LENGTH)  # added to a request without a body
    return {
        "method": record["method"],
        "target": record["target"],
        "headers": kept,
        "body": (record.get("body_len"), record.get("body_sha256")),
    }


def expected_path(value: bytes, backend_port: int) -> bytes:
    """The prefixing convention (contract.py), written out independently of headers.py."""
    pre = PREFIX.rstrip("/").encode()
    for origin in (b"http://127.0.0.1:%d" % backend_port, b"http://localhost:%d" % backend_port):
        if value.startswith(origin):
            return pre + (value[len(origin) :] or b"/")
    if value.startswith(b"/") and not value.startswith(b"//"):
        return pre + value
    return value


def expected_cookie(value: bytes) -> bytes:
    out = []
    for i, attr in enumerate(value.split(b";")):
        name, _, val = attr.partition(b"=")
        if i and name.strip().lower() == b"domain":
            continue
        if i and name.strip().lower() == b"path" and val.strip().startswith(b"/"):
            attr = name + b"=" + PREFIX.rstrip("/").encode() + val.strip()
        out.append(attr)
    return b";".join(out)


def gzip_applies(ex: Exchange, direct: RawResponse) -> bool:
    """The contract's gzip rule, evaluated on the direct answer."""
    ctype = (direct.get("Content-Type") or b"").split(b";")[0].strip().decode().lower()
    cache = b",".join(direct.get_all("Cache-Control")) + b"," + _req(ex, "Cache-Control")
    length = direct.get("Content-Length")
    return (
        direct.status == 200
        and ctype in contract.COMPRESSIBLE
        and direct.get("Content-Encoding") is None
        and (length is None or int(length) >= contract.GZIP_MIN_LENGTH)
        and b"no-transform" not in cache
    )


def _req(ex: Exchange, name: str) -> bytes:
    return b",".join(v for n, v in ex.req_headers if n.lower() == name.lower())


def accepts(ex: Exchange) -> bool:
    ae = _req(ex, "Accept-Encoding")
    return b"gzip" in ae and b"gzip;q=0" not in ae


def normalise_response(
    ex: Exchange, resp: RawResponse, backend_port: int, proxied: bool, gz: bool
) -> dict[str, Any]:
    """An answer minus the declared response changes; ``gz``: the contract's gzip rule holds."""
    text = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in resp.headers]
    drop = (
        contract.HOP_BY_HOP
        | contract.RESPONSE_FRAMING
        | contract.JUPYTER_ADDED
        | contract.SECURITY_HEADERS
        | _connection_tokens(text)
    )
    headers: list[tuple[str, bytes]] = []
    security: list[tuple[str, bytes]] = []
    for n, v in resp.headers:
        name = n.decode("latin-1").lower()
        if name in contract.SECURITY_HEADERS:
            security.append((name, v))
        if name in drop:
            continue
        if proxied and name == "set-cookie":
            cookie_name = v.split(b"=", 1)[0].decode("latin-1").strip()
            if contract.JUPYTER_COOKIE.match(cookie_name):
                continue  # Jupyter's login cookie after a token login
        if not proxied:
            if name in contract.RESPONSE_PREFIXED and name != "refresh":
                v = expected_path(v, backend_port)
            elif name == "refresh" and b"url=" in v:
                head, _, url = v.partition(b"url=")
                v = head + b"url=" + expected_path(url, backend_port)
            elif name == contract.RESPONSE_COOKIE:
                v = expected_cookie(v)
        headers.append((name, v))
    body = resp.body
    encoded_here = proxied and gz and accepts(ex)
    if encoded_here and resp.status == 200:
        # the declared gzip consequences, undone
        assert resp.get("Content-Encoding") == b"gzip", "gzip rule holds but not gzipped"
        headers.remove(("content-encoding", b"gzip"))
        if ex.method != "HEAD":
            body = gzip.decompress(body)
    if proxied and gz and resp.status == 200:
        headers.remove(("vary", b"Accept-Encoding"))
    if not proxied and gz and accepts(ex) and resp.status == 200:
        headers = [
            (n, b"W/" + v if n == contract.GZIP_WEAKENED and v.startswith(b'"') else v)
            for n, v in headers
            if n not in contract.GZIP_REMOVED
        ]
    return {
        "status": resp.status,
        "reason": resp.reason,
        "headers": headers,
        "body": body,
        "truncated": resp.truncated,
        "security": security,
    }


def normalise_304(ex: Exchange, resp: RawResponse, proxied: dict[str, Any]) -> None:
    """A 304 confirming a gzipped copy: weak ETag and Vary added (contract.COMPRESSIBLE)."""
    inm = [t.strip() for t in _req(ex, "If-None-Match").split(b",")]
    etag = resp.get("ETag")
    if resp.status == 304 and etag and not etag.startswith(b"W/") and accepts(ex):
        if b"W/" + etag in inm:
            h = proxied["headers"]
            h[:] = [(n, etag if n == "etag" and v == b"W/" + etag else v) for n, v in h]
            h.remove(("vary", b"Accept-Encoding"))


async def check_exchange(rig: Rig, ex: Exchange) -> None:
    port, _ = await rig.backend()
    sid_d, sid_p = scripts.new_id(), scripts.new_id()
    h, body = request_parts(ex, sid_d)
    direct, _ = await rig.direct(ex.method, ex.path, h, body)
    h, body = request_parts(ex, sid_p)
    proxied, _ = await rig.proxied(ex.method, ex.path, h, body)

    rec_d = normalise_request(await rig.record(sid_d), proxied=False)
    rec_p = normalise_request(await rig.record(sid_p), proxied=True)
    rec_d["target"] = "/" + ex.path  # the direct target is the path below the prefix
    rec_p_target = rec_p["target"]
    assert rec_p_target == rec_d["target"], (rec_p_target, rec_d["target"])
    if ex.early:
        rec_d["body"] = rec_p["body"] = None  # never read by the backend
    assert rec_p == rec_d, ("request differs", rec_p, rec_d)

    gz = gzip_applies(ex, direct)
    nd = normalise_response(ex, direct, port, proxied=False, gz=gz)
    np_ = normalise_response(ex, proxied, port, proxied=True, gz=gz)
    normalise_304(ex, direct, np_)
    # Jupyter's security headers are added; the backend's own are kept next to them
    for item in nd.pop("security"):
        assert item in np_["security"], ("security header lost", item)
    np_.pop("security")
    if ex.status == 204:
        pass  # Content-Length on a 204 is framing (contract.RESPONSE_FRAMING)
    assert np_ == nd, ("response differs", np_, nd)


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ex=exchanges())
def _run(rig: Rig, io_loop: Any, ran: list[Exchange], ex: Exchange) -> None:
    ran.append(ex)
    io_loop.run_sync(lambda: check_exchange(rig, ex), timeout=60)


def test_transparency(rig: Rig, io_loop: Any) -> None:
    """Generated exchanges equal modulo contract.py, over plain HTTP and Jupyter's TLS."""
    ran: list[Exchange] = []
    _run(rig, io_loop, ran)
    print(f"test_transparency[{rig.scheme}]: {len(ran)} generated exchanges")
