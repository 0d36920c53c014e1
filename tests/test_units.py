"""Fast unit tests of the pure parts: command lookup, header policy, cross-site rule."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from tornado.httputil import HTTPHeaders

from libertem_jupyter_proxy.command import CommandError, config_file_path, resolve_command
from libertem_jupyter_proxy.errors import exit_description
from libertem_jupyter_proxy.headers import (
    filter_cookies,
    response_headers,
    rewrite_location,
    rewrite_set_cookie,
    strip_token_query,
    upstream_headers,
)
from libertem_jupyter_proxy.security import cross_site_reason, is_allowed_origin


def _exe(path: Path, text: str = "#!/bin/sh\nexec true\n") -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("LIBERTEM_ROOT", str(tmp_path / "prefix"))
    # the test environment has LiberTEM installed next to its Python: look elsewhere
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-env" / "python"))
    return {"LIBERTEM_ROOT": str(tmp_path / "prefix"), "bindir": str(bindir)}


def _write_config(env: dict[str, str], text: str) -> Path:
    cfg = config_file_path(env)
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(text)
    return cfg


class TestCommandLookup:
    def test_order_traitlet_command_first(self, env, tmp_path):
        exe = _exe(tmp_path / "wrapper.sh")
        _write_config(env, '{"libertem_server_path": "/nonexistent"}')
        r = resolve_command([str(exe), "--extra"], "/also/nonexistent", env)
        assert r.argv == [str(exe), "--extra"]
        assert r.source == "c.LiberTEMProxy.command"

    def test_server_path_traitlet(self, env, tmp_path):
        exe = _exe(tmp_path / "libertem-server")
        r = resolve_command((), str(exe), env)
        assert r.argv == [str(exe)] and r.source == "c.LiberTEMProxy.libertem_server_path"

    def test_json_file_from_libertem_root(self, env, tmp_path):
        exe = _exe(tmp_path / "lt-wrapper")
        cfg = _write_config(env, f'{{"libertem_server_path": "{exe}"}}')
        _exe(Path(env["bindir"]) / "libertem-server")  # PATH loses against the file
        r = resolve_command((), "", env)
        assert r.argv == [str(exe)] and r.source == str(cfg)

    def test_json_file_defaults_to_sys_prefix(self, monkeypatch):
        monkeypatch.delenv("LIBERTEM_ROOT", raising=False)
        import sys

        assert config_file_path() == Path(sys.prefix) / "etc" / "libertem_jupyter_proxy.json"

    def test_path_fallback(self, env):
        exe = _exe(Path(env["bindir"]) / "libertem-server")
        r = resolve_command((), "", env)
        assert r.argv == [str(exe)] and r.source == "PATH"
        assert any("not present" in t for t in r.tried)

    def test_nothing_found_names_everything_tried(self, env):
        with pytest.raises(CommandError) as e:
            resolve_command((), "", env)
        assert "not found" in e.value.message
        text = " ".join(e.value.tried)
        assert str(config_file_path(env)) in text and "PATH" in text
        assert "pip install libertem" in e.value.hint

    def test_invalid_json(self, env):
        cfg = _write_config(env, "{not json")
        with pytest.raises(CommandError) as e:
            resolve_command((), "", env)
        assert str(cfg) in e.value.message and "not valid JSON" in e.value.message
        assert "line 1" in e.value.message

    def test_json_without_key(self, env):
        cfg = _write_config(env, '{"other": 1}')
        with pytest.raises(CommandError) as e:
            resolve_command((), "", env)
        assert str(cfg) in e.value.message and "libertem_server_path" in e.value.message

    @pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
    def test_unreadable_json(self, env):
        cfg = _write_config(env, "{}")
        cfg.chmod(0)
        with pytest.raises(CommandError) as e:
            resolve_command((), "", env)
        assert "cannot be read" in e.value.message

    def test_unreadable_json_as_directory(self, env):
        cfg = config_file_path(env)
        cfg.mkdir(parents=True)  # reading a directory fails for root too
        with pytest.raises(CommandError) as e:
            resolve_command((), "", env)
        assert str(cfg) in e.value.message and "cannot be read" in e.value.message

    def test_missing_file_in_json(self, env):
        cfg = _write_config(env, '{"libertem_server_path": "/no/such/libertem-server"}')
        with pytest.raises(CommandError) as e:
            resolve_command((), "", env)
        assert "/no/such/libertem-server" in e.value.message and str(cfg) in e.value.message

    def test_not_executable(self, env, tmp_path):
        f = tmp_path / "libertem-server"
        f.write_text("#!/bin/sh\n")
        with pytest.raises(CommandError) as e:
            resolve_command((), str(f), env)
        assert "not executable" in e.value.message and "chmod +x" in e.value.hint

    def test_directory(self, env, tmp_path):
        with pytest.raises(CommandError) as e:
            resolve_command((), str(tmp_path), env)
        assert "is a directory" in e.value.message

    def test_bare_name_in_command_uses_path(self, env):
        with pytest.raises(CommandError) as e:
            resolve_command(["no-such-program"], "", env)
        assert "not found on PATH" in e.value.message


class TestHeaders:
    def _up(self, **headers: str) -> dict[str, str]:
        h = HTTPHeaders()
        for k, v in headers.items():
            h.add(k.replace("_", "-"), v)
        out = upstream_headers(
            h,
            token="T",
            prefix="/user/a/libertem/",
            proto="https",
            host="hub.example",
            remote_ip="10.0.0.1",
            jupyter_cookie_names={"username-hub-example"},
        )
        return {k.lower(): v for k, v in out}

    def test_token_added_and_browser_key_replaced(self):
        h = self._up(X_Api_Key="evil", Authorization="token jupyter")
        assert h["x-api-key"] == "T" and "authorization" not in h

    def test_hop_by_hop_and_connection_listed(self):
        h = self._up(
            Connection="keep-alive, X-Secret-Hop",
            X_Secret_Hop="1",
            TE="trailers",
            Keep_Alive="5",
            Accept="*/*",
        )
        hop = {"connection", "x-secret-hop", "te", "keep-alive"}
        assert "accept" in h and not hop & set(h)

    def test_forwarded_headers_are_ours(self):
        h = self._up(X_Forwarded_For="6.6.6.6", X_Forwarded_Host="evil")
        assert h["x-forwarded-for"] == "10.0.0.1"
        assert h["x-forwarded-host"] == "hub.example"
        assert h["x-forwarded-proto"] == "https"
        assert "x-forwarded-prefix" not in h  # one convention: paths are rewritten instead

    def test_cookie_filter(self):
        assert (
            filter_cookies(
                "username-hub-example=s; _xsrf=x; jupyterhub-user-a=y; mine=1; other=2",
                {"username-hub-example"},
            )
            == "mine=1; other=2"
        )
        assert "cookie" not in self._up(Cookie="_xsrf=1; jupyterhub-session-id=2")

    def test_strip_token_query(self):
        assert strip_token_query("token=abc&a=%20b&tokenx=1") == "a=%20b&tokenx=1"
        assert strip_token_query("") == ""

    @pytest.mark.parametrize(
        ("location", "expected"),
        [
            ("http://127.0.0.1:5555/api/x/?q=1", "/p/libertem/api/x/?q=1"),
            ("http://localhost:5555/", "/p/libertem/"),
            ("/api/y/", "/p/libertem/api/y/"),
            ("relative/", "relative/"),
            ("https://other.example/", "https://other.example/"),
            ("http://127.0.0.1:9999/", "http://127.0.0.1:9999/"),
        ],
    )
    def test_rewrite_location(self, location, expected):
        assert rewrite_location(location, 5555, "/p/libertem/") == expected

    def test_rewrite_set_cookie(self):
        out = rewrite_set_cookie("sid=1; Path=/api; HttpOnly; Domain=127.0.0.1", "/p/libertem/")
        assert "Path=/p/libertem/api" in out and "HttpOnly" in out and "Domain" not in out
        # no Path: its default (the request's directory) is already inside the prefix
        assert rewrite_set_cookie("a=b", "/p/libertem/") == "a=b"

    def test_response_headers_drop_hop_by_hop(self):
        out = response_headers(
            [
                ("Transfer-Encoding", "chunked"),
                ("Connection", "close"),
                ("ETag", '"1"'),
                ("Location", "http://127.0.0.1:7/x"),
            ],
            7,
            "/l/",
        )
        assert out == [("ETag", '"1"'), ("Location", "/l/x")]


class TestCrossSite:
    @pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
    def test_safe_methods_pass(self, method):
        assert cross_site_reason(method, {}, "h:1") is None

    @pytest.mark.parametrize(
        ("headers", "ok"),
        [
            ({"Origin": "http://h:1"}, True),
            ({"Origin": "HTTP://H:1"}, True),
            ({"Origin": "http://evil:1"}, False),
            ({"Origin": "null"}, False),
            ({}, False),
            ({"Referer": "http://h:1/user/a/libertem/"}, True),
            ({"Referer": "http://evil/x"}, False),
            ({"Referer": "not a url"}, False),
        ],
    )
    def test_unsafe_methods_need_same_origin(self, headers, ok):
        assert (cross_site_reason("DELETE", headers, "h:1") is None) is ok

    def test_allow_origin_settings(self):
        assert is_allowed_origin("https://lab.example", "h", allow_origin="https://lab.example")
        assert not is_allowed_origin("https://x.example", "h", allow_origin="https://lab.example")
        assert is_allowed_origin(
            "https://a.lab.example", "h", allow_origin_pat=r"https://.*\.lab\.example"
        )
        assert is_allowed_origin("null", "h", allow_origin="*")


def test_exit_description():
    assert exit_description(0) == "exited with code 0"
    assert "SIGKILL" in exit_description(-9)
    assert exit_description(None) == "is still running"


class TestTraits:
    def test_command_accepts_json_list_string(self):
        from libertem_jupyter_proxy.extension import LiberTEMProxy

        app = LiberTEMProxy()
        app.command = ['["/usr/bin/python3", "/opt/x.py"]']
        assert app.command == ["/usr/bin/python3", "/opt/x.py"]
        app.extra_args = ["--cpus=2"]
        assert app.extra_args == ["--cpus=2"]

    @pytest.mark.parametrize("value", [True, False, 0, -1, "²", "lots"])
    def test_cpus_refuses_what_is_not_a_count(self, value):
        """Red-team finding: ``cpus = True`` passed the check (a bool is an int) and then
        disabled the whole extension; ``"²"`` raised ValueError instead of naming the option."""
        from traitlets import TraitError

        from libertem_jupyter_proxy.extension import LiberTEMProxy

        with pytest.raises(TraitError, match=r"LiberTEMProxy\.cpus"):
            LiberTEMProxy(cpus=value)

    @pytest.mark.parametrize(
        ("name", "value"),
        [("start_timeout", -5), ("stop_timeout", -1), ("max_crashes", -1), ("idle_timeout", -1)],
    )
    def test_numbers_out_of_range_are_refused(self, name, value):
        """Red-team finding: ``max_crashes = -1`` or ``start_timeout = -5`` were accepted and
        then failed every start with a message that blamed LiberTEM."""
        from traitlets import TraitError

        from libertem_jupyter_proxy.extension import LiberTEMProxy

        with pytest.raises(TraitError):
            LiberTEMProxy(**{name: value})

    def test_command_bad_json_names_setting(self):
        from traitlets import TraitError

        from libertem_jupyter_proxy.extension import LiberTEMProxy

        app = LiberTEMProxy()
        with pytest.raises(TraitError, match=r"LiberTEMProxy\.command"):
            app.command = ['["unterminated']


def test_found_next_to_jupyters_python_when_not_on_path(tmp_path, monkeypatch):
    """`/opt/venv/bin/jupyter lab` without an activated venv: same environment, not on PATH."""
    import sys

    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    exe = _exe(bindir / "libertem-server")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = resolve_command((), "", {"LIBERTEM_ROOT": str(tmp_path / "prefix")})
    assert r.argv == [str(exe)] and r.source == "Jupyter's environment"
    assert any("PATH" in t for t in r.tried)
