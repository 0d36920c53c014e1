"""On-the-fly gzip for the GUI's text responses.

libertem-server never compresses: its JS bundle is 738 KB (225 KB gzipped), its CSS 524 KB
(97 KB gzipped). Over a hub or a VPN that is seconds of a scientist's time at every cold load.
Each chunk is compressed and sync-flushed as it arrives, so streaming responses stay streaming.
"""

from __future__ import annotations

import zlib

from . import contract

COMPRESSIBLE = contract.COMPRESSIBLE
MIN_LENGTH = contract.GZIP_MIN_LENGTH


def no_transform(cache_control: str | None) -> bool:
    """Whether a ``Cache-Control`` value forbids intermediaries to transform the body
    (RFC 9111 5.2.1.6 in requests, 5.2.2.6 in responses): then the proxy never gzips."""
    if not cache_control:
        return False
    return any(
        d.split("=", 1)[0].strip().lower() == "no-transform" for d in cache_control.split(",")
    )


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (``gzip;q=0`` forbids it).

    An explicit ``gzip`` entry wins over ``*`` wherever they stand (RFC 9110 12.5.3: ``*``
    matches only codings not listed), so ``*, gzip;q=0`` refuses gzip.
    """
    explicit: float | None = None
    wildcard: float | None = None
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().partition(";")
        coding = coding.strip().lower()
        if coding not in ("gzip", "*"):
            continue
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if coding == "gzip":
            explicit = q if explicit is None else max(explicit, q)
        else:
            wildcard = q if wildcard is None else max(wildcard, q)
    chosen = explicit if explicit is not None else wildcard
    return chosen is not None and chosen > 0


def should_compress(
    status: int,
    content_type: str | None,
    content_encoding: str | None,
    content_length: str | None,
    cache_control: str | None = None,
) -> bool:
    """Compress only text 200s the backend did not encode itself and did not mark
    ``no-transform`` (the complete rule and its consequences: :data:`.contract.COMPRESSIBLE`)."""
    if status != 200 or content_encoding or not content_type or no_transform(cache_control):
        return False
    if content_type.split(";", 1)[0].strip().lower() not in COMPRESSIBLE:
        return False
    if content_length is not None:
        try:
            if int(content_length) < MIN_LENGTH:
                return False
        except ValueError:
            return False
    return True


class GzipStream:
    """A gzip encoder whose every ``compress`` output can be sent at once."""

    def __init__(self, level: int = 5) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)
