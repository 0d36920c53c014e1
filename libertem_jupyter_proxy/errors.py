"""Why LiberTEM is not available: one exception type that carries what a page must explain."""

from __future__ import annotations

import signal
from collections.abc import Sequence


class BackendError(Exception):
    """libertem-server is not available; carries everything an error page needs to explain why.

    ``kind`` is one of ``not-found`` (command/config problem), ``exited`` (exited while starting),
    ``timeout`` (never became ready), ``crash-loop`` (too many crashes); for a single
    proxied request also ``died``, ``unreachable`` and ``request-timeout``.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        exit_code: int | None = None,
        log_lines: Sequence[str] = (),
        hint: str = "",
        tried: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exit_code = exit_code
        self.log_lines = list(log_lines)
        self.hint = hint
        self.tried = list(tried)

    def to_dict(self) -> dict[str, object]:
        return {
            "error": self.kind,
            "message": self.message,
            "exit_code": self.exit_code,
            "hint": self.hint,
            "tried": self.tried,
            "log": self.log_lines,
        }


def exit_description(code: int | None) -> str:
    """Words for an exit code: negative codes are signals (asyncio's convention)."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"
