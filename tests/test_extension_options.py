"""Options as Jupyter really loads them: through ServerApp's command line and config.

Regression: traitlets' ``Application.parse_command_line`` assigns the server's positional
arguments to ``extra_args``, the name of our option, so ``c.LiberTEMProxy.extra_args`` was
lost and ``jupyter lab a.ipynb`` passed ``a.ipynb`` to libertem-server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.serverapp import ServerApp
from traitlets.config import Config

from .conftest import TOKEN, fake_command
from .helpers import OTHER_EXTENSIONS


@pytest.fixture
def notebook(jp_dirs: dict[str, Path]) -> str:
    """A file given to Jupyter on its command line (``jupyter lab analysis.ipynb``)."""
    path = jp_dirs["root"] / "analysis.ipynb"
    path.write_text("{}")
    return str(path)


@pytest.fixture
def make_server(io_loop: Any, jp_dirs: dict[str, Path]) -> Iterator[Any]:
    apps: list[ServerApp] = []

    def make(argv: list[str], **options: Any) -> Any:
        config = Config()
        config.ServerApp.jpserver_extensions = {
            "libertem_jupyter_proxy": True,
            **{name: False for name in OTHER_EXTENSIONS},
        }
        config.ServerApp.reraise_server_extension_failures = True
        config.ServerApp.root_dir = str(jp_dirs["root"])
        config.ServerApp.open_browser = False
        config.IdentityProvider.token = TOKEN
        config.LiberTEMProxy.command = fake_command()
        for key, value in options.items():
            setattr(config.LiberTEMProxy, key, value)
        app = ServerApp(config=config)
        apps.append(app)
        app.initialize(argv=argv, new_httpserver=False)
        return app.web_app.settings["libertem_proxy"].supervisor.config

    yield make
    for app in apps:
        io_loop.run_sync(app._cleanup, timeout=60)
    ServerApp.clear_instance()


def test_configured_extra_args_survive_a_positional_argument(make_server, notebook):
    config = make_server([notebook], extra_args=["--snooze-timeout=30"])
    assert list(config.extra_args) == ["--snooze-timeout=30"]


def test_extra_args_from_the_command_line(make_server):
    config = make_server(
        ["--LiberTEMProxy.extra_args=--snooze-timeout=30", "--LiberTEMProxy.extra_args=-l"]
    )
    assert list(config.extra_args) == ["--snooze-timeout=30", "-l"]


def test_positional_arguments_never_reach_libertem(make_server, notebook):
    config = make_server([notebook])
    assert list(config.extra_args) == []
