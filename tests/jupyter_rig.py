"""A Jupyter server (plain HTTP, or TLS with its own ``certfile``/``keyfile``) in front of the raw
backend (``tests/raw_backend.py``), and a raw client for both: the rig of the generated suites.

Jupyter's HTTP server is made by Jupyter itself (``ServerApp.init_httpserver``) from
``ServerApp.certfile``/``keyfile``, exactly as ``jupyter server --certfile=...`` does; the CA and
the server certificate (for 127.0.0.1) are made here with ``cryptography``.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jupyter_server.serverapp import ServerApp
from traitlets.config import Config

from . import raw_http
from .helpers import OTHER_EXTENSIONS, free_port

RAW_BACKEND = Path(__file__).parent / "raw_backend.py"
TOKEN = "rig-jupyter-token-5ca1ab1e"
BASE_URL = "/user/alice/"
PREFIX = BASE_URL + "libertem/"


@dataclass
class TLSFiles:
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """What a browser that trusts the CA uses (hostname 127.0.0.1 checked)."""
        return ssl.create_default_context(cafile=str(self.ca))


def make_tls_files(directory: Path) -> TLSFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@dataclass
class Rig:
    """One Jupyter with the extension, the raw backend behind it, and where to reach both."""

    app: ServerApp
    port: int
    tls: ssl.SSLContext | None

    @property
    def supervisor(self) -> Any:
        return self.app.web_app.settings["libertem_proxy"].supervisor

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    async def backend(self) -> tuple[int, str]:
        """The raw backend's (port, token), starting it if needed."""
        run = await self.supervisor.ensure_running()
        return run.port, run.token

    async def proxied(
        self,
        method: str,
        path: str,
        headers: list[tuple[Any, Any]],
        body: list[bytes] = (),  # type: ignore[assignment]
        **kwargs: Any,
    ) -> tuple[raw_http.RawResponse, raw_http.RawResponse | None]:
        """``method PREFIX+path`` through Jupyter, authenticated as a script (token header)."""
        h = [("Host", f"127.0.0.1:{self.port}"), ("Authorization", f"token {TOKEN}"), *headers]
        head = raw_http.request_head(method, PREFIX + path.lstrip("/"), h)
        return await raw_http.exchange(self.port, head, list(body), tls=self.tls, **kwargs)

    async def direct(
        self,
        method: str,
        path: str,
        headers: list[tuple[Any, Any]],
        body: list[bytes] = (),  # type: ignore[assignment]
        **kwargs: Any,
    ) -> tuple[raw_http.RawResponse, raw_http.RawResponse | None]:
        """The same request straight to the backend, with its key."""
        port, token = await self.backend()
        h = [("Host", f"127.0.0.1:{port}"), ("X-Api-Key", token), *headers]
        head = raw_http.request_head(method, "/" + path.lstrip("/"), h)
        return await raw_http.exchange(port, head, list(body), **kwargs)

    async def record(self, script_id: str) -> dict[str, Any]:
        """What the backend received for the script ``script_id``."""
        import json

        resp, _ = await self.direct("GET", f"_record/{script_id}", [])
        return json.loads(resp.body)


def make_rig(io_loop: Any, jp_dirs: dict[str, Path], tls: TLSFiles | None, **options: Any) -> Rig:
    config = Config()
    config.ServerApp.jpserver_extensions = {
        "libertem_jupyter_proxy": True,
        **{name: False for name in OTHER_EXTENSIONS},
    }
    config.ServerApp.reraise_server_extension_failures = True
    config.ServerApp.base_url = BASE_URL
    config.ServerApp.root_dir = str(jp_dirs["root"])
    config.ServerApp.open_browser = False
    config.ServerApp.ip = "127.0.0.1"
    config.IdentityProvider.token = TOKEN
    if tls is not None:
        config.ServerApp.certfile = str(tls.cert)
        config.ServerApp.keyfile = str(tls.key)
    proxy = {
        "command": [sys.executable, str(RAW_BACKEND)],
        "start_timeout": 20.0,
        "stop_timeout": 3.0,
        "restart_backoff": 0.05,
        **options,
    }
    for key, value in proxy.items():
        setattr(config.LiberTEMProxy, key, value)
    app = ServerApp(config=config)
    app.initialize(argv=[], new_httpserver=True)  # Jupyter makes its (TLS) HTTP server itself
    port = free_port()
    app.http_server.listen(port, "127.0.0.1")
    return Rig(app, port, tls.client_context() if tls else None)


@pytest.fixture(params=["plain", "tls"])
def rig(
    request: pytest.FixtureRequest, io_loop: Any, jp_dirs: dict[str, Path], tls_files: TLSFiles
) -> Iterator[Rig]:
    """The rig over plain HTTP and over Jupyter's own TLS; options from ``proxy_config``."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("proxy_config"))):
        options.update(marker.kwargs)
    r = make_rig(io_loop, jp_dirs, tls_files if request.param == "tls" else None, **options)
    yield r
    io_loop.run_sync(r.app._cleanup, timeout=60)
    ServerApp.clear_instance()
