"""What the kept gzip bodies are keyed by (red-team finding: one query's body was served for
another query of the same path, because an ETag is only unique within one URL)."""

from __future__ import annotations

import gzip

GZIP = {"Accept-Encoding": "gzip"}


async def _text(client, query: str) -> tuple[bytes, str]:
    resp = await client.fetch(
        f"libertem/_fake/text?size=3000&{query}", headers=GZIP, decompress_response=False
    )
    assert resp.code == 200 and resp.headers["Content-Encoding"] == "gzip"
    return gzip.decompress(resp.body), resp.headers["ETag"]


async def test_same_path_and_etag_with_another_query_is_not_served_the_kept_body(client):
    alice, etag_a = await _text(client, "note=alice")
    bob, etag_b = await _text(client, "note=bob")
    assert etag_a == etag_b  # the backend's ETag ignores the query
    assert alice.startswith(b"alice") and bob.startswith(b"bob")
    again, _ = await _text(client, "note=alice")  # a kept body, still the right one
    assert again == alice
