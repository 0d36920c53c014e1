"""Why LiberTEM is not available: one exception type that carries what a page must explain."""

from __future__ import annotations

import signal
from collections.abc import Sequence


class BackendError(Exception):
    """libertem-server is not available; carries everything an error page needs to explain why.

    ``kind`` is one of ``not-found`` (command/config problem), ``exited`` (exited while starting),
    ``timeout`` (never became ready), ``crash-loop`` (too many crashes), ``stopped`` (stopped on
    purpose: see :class:`StoppedError`), ``config`` (a malformed ``c.LiberTEMProxy`` option:
    see :class:`ConfigProblem`); for a single proxied request also ``died``, ``unreachable`` and
    ``request-timeout``.
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
        problems: Sequence[ConfigProblem] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exit_code = exit_code
        self.log_lines = list(log_lines)
        self.hint = hint
        self.tried = list(tried)
        self.problems = list(problems)

    def to_dict(self) -> dict[str, object]:
        extra: dict[str, object] = {}
        if self.problems:
            extra["problems"] = [p.to_dict() for p in self.problems]
        return {
            **extra,
            "error": self.kind,
            "message": self.message,
            "exit_code": self.exit_code,
            "hint": self.hint,
            "tried": self.tried,
            "log": self.log_lines,
        }


class StoppedError(BackendError):
    """LiberTEM was stopped on purpose and this request may not start it again.

    After a deliberate stop (the GUI's Shutdown, the stop API, an idle stop, Jupyter stopping)
    only a person starts LiberTEM: a page navigation to ``/libertem/``, the Start/Retry button
    or the start API. Everything else (the GUI's websocket reconnecting once a second, API
    calls of an open tab, scripts) gets this cheap answer, HTTP 503 with
    ``{"state": "stopped", "reason": ...}``, and is not counted as activity.
    """

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(
            "stopped",
            f"LiberTEM is stopped ({reason}).",
            hint=hint or "Open the LiberTEM page again or press Start to start it.",
        )
        self.reason = reason

    def to_dict(self) -> dict[str, object]:
        return {"state": "stopped", "reason": self.reason, **super().to_dict()}


class ConfigProblem:
    """One ``c.LiberTEMProxy`` option whose value was refused: the option, the value given, and
    what the option expects (traitlets' own description, e.g. "a float")."""

    def __init__(self, option: str, value: object, expected: str) -> None:
        self.option = option
        self.value = value
        self.expected = expected

    def describe(self) -> str:
        return f"c.LiberTEMProxy.{self.option} = {self.value!r} is not valid: {self.expected}."

    def to_dict(self) -> dict[str, object]:
        return {"option": self.option, "value": repr(self.value), "expected": self.expected}


def config_error(problems: Sequence[ConfigProblem]) -> BackendError:
    """The error every request gets while the configuration has malformed options: LiberTEM is
    not started with half of the administrator's settings."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more, listed below)" if len(problems) > 1 else ""
    return BackendError(
        "config",
        f"The LiberTEM proxy's configuration has an invalid option: {first.describe()}{more}",
        hint="Correct the option in jupyter_server_config.py (or on the command line) and "
        "restart Jupyter. LiberTEM is not started while an option is invalid.",
        problems=problems,
    )


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
