"""Malformed ``c.LiberTEMProxy`` options: named to the administrator instead of half-applied.

traitlets raises ``TraitError`` at the first option of a wrong type while loading the config;
jupyter_server logs that as a warning ("error linking extension") and runs the extension
anyway, with the options before it applied and the ones after it not. Here each option is
checked on its own first: the good ones load, each bad one becomes a
:class:`~.errors.ConfigProblem` (option, value given, what it expects), and the supervisor
refuses to start LiberTEM while there is one, so ``/libertem/``, the API and the status API all
say what to fix.
"""

from __future__ import annotations

import copy
from typing import Any

from traitlets import TraitError
from traitlets.config import Config, Configurable
from traitlets.config.loader import DeferredConfig

from .errors import BackendError, ConfigProblem, config_error

_PROBLEMS = "_libertem_config_problems"


def load_checked(
    app: Configurable, cfg: Config, section_names: Any = None, traits: Any = None
) -> Config:
    """Load every option of ``app``'s sections in ``cfg`` on its own, through traitlets' own
    code (so a value is accepted exactly when traitlets accepts it); return ``cfg`` without
    the bad ones (a copy, only if there are any) and remember the problems on ``app``."""
    if traits is None:
        traits = app.traits(config=True)
    sections = section_names if section_names is not None else app.section_names()
    problems: dict[str, ConfigProblem] = getattr(app, _PROBLEMS, {})
    bad: set[str] = set()
    mine = app._find_my_config(cfg)  # type: ignore[attr-defined]
    for name, value in mine.items():
        trait = traits.get(name)
        if trait is None:
            continue  # traitlets itself warns about unknown names, with a suggestion
        single = Config()
        single[type(app).__name__][name] = value
        try:
            Configurable._load_config(app, single, traits={name: trait})  # type: ignore[attr-defined]
        except TraitError as e:
            problems[name] = ConfigProblem(name, _shown(value), _expected(trait, e))
            bad.add(name)
        else:
            problems.pop(name, None)
    setattr(app, _PROBLEMS, problems)
    if not bad:
        return cfg
    cleaned = copy.deepcopy(cfg)
    for section in sections:
        if section in cleaned:
            for name in bad:
                cleaned[section].pop(name, None)
    return cleaned


def _shown(value: Any) -> Any:
    """The value as the administrator wrote it (a command-line value arrives wrapped)."""
    if isinstance(value, DeferredConfig) and isinstance(value, str):
        return str(value)
    if isinstance(value, DeferredConfig) and isinstance(value, list):
        return list(value)
    return value


def _expected(trait: Any, error: TraitError) -> str:
    """What the option expects, in traitlets' own words ("a float", "a list of ...")."""
    message = str(error)
    if message.startswith("The '"):  # traitlets' generic message: its info() is the clearer part
        return f"expected {trait.info()}"
    return message  # one of our own validators: its message already names the rule


def report(app: Configurable) -> BackendError | None:
    """The error for the supervisor (None if all options are fine); logged once, loudly."""
    problems = list(getattr(app, _PROBLEMS, {}).values())
    if not problems:
        return None
    error = config_error(problems)
    for p in problems:
        app.log.error("LiberTEM proxy: %s LiberTEM will not start.", p.describe())  # type: ignore[attr-defined]
    return error
