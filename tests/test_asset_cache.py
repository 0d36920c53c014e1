"""Caching of the GUI's static files (``asset_cache``): immutable hashed assets, kept gzip bodies.

The proxy tests run the benchmark's backend (``bench/backend.py``: the fake libertem-server plus
a built client served by tornado from a directory, with ETags as libertem-server sends them)
over a small Vite-like build made here: ``index.html`` and ``assets/<name>-<8-char hash>.<ext>``.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libertem_jupyter_proxy import asset_cache
from libertem_jupyter_proxy.asset_cache import (
    IMMUTABLE,
    GzipBodyCache,
    cache_control_for,
    gzip_whole,
    is_hashed_asset,
    keepable,
)

REPO = Path(__file__).resolve().parents[1]
BENCH_BACKEND = REPO / "bench" / "backend.py"
JS = b"export function frame(x) { return x * 2; } // LiberTEM GUI bundle stand-in\n" * 4000
CSS = b".ui.button { color: #123456; margin: 0 auto; } /* semantic-ui stand-in */\n" * 3000
INDEX = (
    b'<!doctype html><html><head><script type="module" src="./assets/index-8xDizhD5.js">'
    b'</script><link rel="stylesheet" href="./assets/index-D3aDzOqR.css"></head>'
    b'<body><div id="root"></div></body></html>' + b"<!-- padding -->" * 100
)


# ------------------------------------------------------------------ the rules on their own
@pytest.mark.parametrize(
    "path",
    [
        "/assets/index-8xDizhD5.js",
        "/assets/index-D3aDzOqR.css",
        "/assets/LiberTEM%20logo-medium-ae_FW7Aj.png",  # LiberTEM 0.16.0, space encoded
        "/assets/brand-icons-XL9sxUpA.woff2",
        "/assets/icons-Du6TOHnR.woff2",
    ],
)
def test_libertem_hashed_asset_names_are_recognised(path):
    assert is_hashed_asset(path)
    assert cache_control_for("GET", path, 200, None) == IMMUTABLE
    assert "private" in IMMUTABLE and "immutable" in IMMUTABLE  # behind the user's login


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/index.html",
        "/favicon.ico",
        "/manifest.json",
        "/assets/main.js",  # no hash
        "/assets/index-8xDizhD.js",  # 7 characters: not a Vite hash
        "/assets/sub/dir-8xDizhD5.js",  # not directly in assets/
        "/api/config/",
        "/api/datasets/index-8xDizhD5.js",
        "/static/index-8xDizhD5.js",
    ],
)
def test_everything_else_keeps_the_backend_headers(path):
    assert cache_control_for("GET", path, 200, None) is None


def test_only_successful_reads_without_backend_cache_control():
    path = "/assets/index-8xDizhD5.js"
    assert cache_control_for("HEAD", path, 200, None) == IMMUTABLE
    assert cache_control_for("GET", path, 404, None) is None
    assert cache_control_for("GET", path, 304, None) is None
    assert cache_control_for("POST", path, 200, None) is None
    assert cache_control_for("GET", path, 200, "no-cache") is None  # the backend's word wins


def test_keepable_needs_a_strong_etag_a_length_and_no_api():
    assert keepable("GET", "/assets/a.js", '"abc"', "5000")
    assert not keepable("GET", "/assets/a.js", 'W/"abc"', "5000")
    assert not keepable("GET", "/assets/a.js", None, "5000")
    assert not keepable("GET", "/assets/a.js", '"abc"', None)  # streamed: not kept
    assert not keepable("GET", "/assets/a.js", '"abc"', str(asset_cache.MAX_ENTRY + 1))
    assert not keepable("GET", "/api/config/", '"abc"', "5000")
    assert not keepable("HEAD", "/assets/a.js", '"abc"', "5000")


# one operation on the cache: ("put", key, size) or ("get", key)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 7), st.integers(0, 400)),
        st.tuples(st.just("get"), st.integers(0, 7)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, limit=st.integers(1, 1000))
def test_body_cache_stays_bounded_and_returns_what_was_put(ops, limit):
    """Against a model: a hit is always the last body put for that (path, ETag); the kept bytes
    never exceed the limit; the most recently used entries are the ones kept."""
    cache = GzipBodyCache(max_total=limit)
    model: dict[int, bytes] = {}
    for op in ops:
        key = op[1]
        if op[0] == "put":
            body = bytes([key]) * op[2]
            cache.put(f"/assets/{key}", '"e"', body)
            model[key] = body
        else:
            got = cache.get(f"/assets/{key}", '"e"')
            if got is not None:
                assert got == model[key]
        assert cache.size == sum(len(v) for v in cache._entries.values()) <= limit
    if ops and ops[-1][0] == "put" and ops[-1][2] <= limit:  # the newest entry always fits
        assert cache.get(f"/assets/{ops[-1][1]}", '"e"') == model[ops[-1][1]]


def test_a_body_too_big_to_keep_replaces_the_old_one():
    """Found by the property test above: a put that does not fit left the old body served."""
    cache = GzipBodyCache(max_total=1)
    cache.put("/a", '"e"', b"")
    cache.put("/a", '"e"', b"xx")
    assert cache.get("/a", '"e"') is None and cache.size == 0


async def test_kept_body_is_a_complete_gzip_of_the_backend_bytes():
    cache = GzipBodyCache()
    first = await cache.gzipped("/assets/index-8xDizhD5.js", '"x"', JS)
    assert gzip.decompress(first) == JS
    again = await cache.gzipped("/assets/index-8xDizhD5.js", '"x"', b"ignored: same ETag")
    assert again is first and cache.hits == 1 and cache.misses == 1
    assert gzip.decompress(gzip_whole(b"")) == b""


# ------------------------------------------------------------------ through the proxy
@pytest.fixture
def client_dir(tmp_path: Path) -> Path:
    root = tmp_path / "vite-build"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_bytes(INDEX)
    (root / "assets" / "index-8xDizhD5.js").write_bytes(JS)
    (root / "assets" / "index-D3aDzOqR.css").write_bytes(CSS)
    (root / "assets" / "plain.js").write_bytes(JS)
    return root


@pytest.fixture
def proxy_options(client_dir: Path) -> dict[str, Any]:
    return {
        "command": [sys.executable, str(BENCH_BACKEND)],
        "extra_env": {"LIBERTEM_BENCH_CLIENT_DIR": str(client_dir)},
        "start_timeout": 20.0,
        "stop_timeout": 3.0,
    }


GZIP = {"Accept-Encoding": "gzip"}


async def test_hashed_assets_are_immutable_and_private(client):
    for name in ("index-8xDizhD5.js", "index-D3aDzOqR.css"):
        resp = await client.fetch(
            f"libertem/assets/{name}", headers=GZIP, decompress_response=False
        )
        assert resp.code == 200
        assert resp.headers["Cache-Control"] == "private, max-age=31536000, immutable"


async def test_index_api_and_unhashed_files_stay_revalidated(client):
    for path in ("libertem/", "libertem/assets/plain.js", "libertem/api/config/"):
        resp = await client.fetch(path, headers=GZIP, decompress_response=False)
        assert resp.code == 200, path
        assert "immutable" not in resp.headers.get("Cache-Control", ""), path


async def test_gzip_body_is_compressed_once_per_etag(client, app):
    path = "libertem/assets/index-8xDizhD5.js"
    bodies = []
    for _ in range(3):
        resp = await client.fetch(path, headers=GZIP, decompress_response=False)
        assert resp.code == 200 and resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(resp.body) == JS
        bodies.append(resp.body)
    cache = asset_cache.cache_in(app.settings)
    assert (cache.misses, cache.hits) == (1, 2)
    assert bodies[0] == bodies[1] == bodies[2]
    assert len(cache) == 1 and cache.size == len(bodies[0])
    # without gzip the identity bytes pass as they are, and the cache is not involved
    plain = await client.fetch(
        path, headers={"Accept-Encoding": "identity"}, decompress_response=False
    )
    assert plain.body == JS and "Content-Encoding" not in plain.headers
    assert (cache.misses, cache.hits) == (1, 2)


async def test_revalidation_of_a_kept_body_still_answers_304(client):
    path = "libertem/assets/index-D3aDzOqR.css"
    first = await client.fetch(path, headers=GZIP, decompress_response=False)
    etag = first.headers["ETag"]
    again = await client.fetch(path, headers={**GZIP, "If-None-Match": etag})
    assert again.code == 304
