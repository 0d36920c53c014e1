"""Mutual TLS for the dask cluster that libertem-server starts, with keys made per start.

Why: the local cluster LiberTEM starts (GUI "Connect" with a local cluster, or ``--cpus``) is a
``distributed.SpecCluster`` whose scheduler, nannies and workers listen on all interfaces
without authentication; anyone who can reach the scheduler port can run code as the LiberTEM
user (``Client(addr).run(...)``, measured with LiberTEM 0.16.0 / distributed 2026.8.0, see
docs/security.rst). libertem-server has no option for it, but dask reads its configuration from
``DASK_*`` environment variables in every process of the cluster (dask docs, "Configuration",
environment variables: ``__`` separates levels; values go through ``ast.literal_eval``).

What: per start, a fresh certificate authority signs one certificate for the cluster; the CA's
private key is never written anywhere and is forgotten at once, so no other certificate can
ever be signed by it. The certificate and its key go into ``<run dir>/dask-tls/`` (0700
directory, 0600 files) and are given to the scheduler, workers, nannies and LiberTEM's own
client through ``distributed.comm.tls.*``. dask's TLS contexts require a peer certificate on
both sides (``verify_mode = CERT_REQUIRED`` in ``distributed.comm.tls``), so only processes that
can read that directory - the run itself - can join or use the cluster. The directory goes with
the run directory however the run ends (supervisor cleanup, the guard after a SIGKILL of
Jupyter, the atexit last resort).

Plain ``tcp://`` addresses keep working for "Connect to existing cluster", because
``distributed.comm.require-encryption`` is left alone: only the default scheme is ``tls``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "SCHEDULER_HTTP_ROUTES",
    "ClusterCredentials",
    "cluster_environment",
    "make_credentials",
]

# distributed's default scheduler routes (distributed 2026.8.0, distributed.yaml:
# scheduler.http.routes) without ``distributed.http.proxy``, which forwards requests to other
# hosts and ports (an open relay for everyone who reaches the dashboard), and without
# ``distributed.http.scheduler.info``, whose pages fetch the workers' logs and call stacks (file
# names of the user's data). What stays is read-only numbers: health, metrics, JSON summaries.
# The HTTP server itself cannot be turned off by configuration; LiberTEM does not use it.
SCHEDULER_HTTP_ROUTES = (
    "distributed.http.scheduler.prometheus",
    "distributed.http.scheduler.json",
    "distributed.http.health",
    "distributed.http.statics",
)

# A run may last as long as a Jupyter server does; the keys die with the run anyway.
_VALIDITY = datetime.timedelta(days=365)
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class ClusterCredentials:
    """Paths of the PEM files of one run's cluster."""

    directory: str
    ca_file: str  # the CA certificate that every peer must present a certificate of
    cert: str  # the cluster's certificate (scheduler, workers, nannies, client)
    key: str  # its private key (0600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "libertem-jupyter-proxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: str, data: bytes) -> None:
    """Create ``path`` with mode 0600; never follow or overwrite an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_credentials(run_dir: str) -> ClusterCredentials:
    """A new CA and a cluster certificate signed by it, written to ``<run_dir>/dask-tls/``.

    Keys are ECDSA P-256 (quick to make: about a millisecond; accepted by every OpenSSL that
    dask supports). The certificate is valid for client and server use, names ``localhost``
    and ``127.0.0.1`` (dask does not check host names, but other TLS clients may), and is
    valid for a year. Raises OSError if the files cannot be written.
    """
    directory = os.path.join(run_dir, "dask-tls")
    os.mkdir(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + _VALIDITY

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("LiberTEM dask cluster CA (one run)")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("LiberTEM dask cluster"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    del ca_key  # never stored: nothing else can ever be signed by this CA

    creds = ClusterCredentials(
        directory=directory,
        ca_file=os.path.join(directory, "ca.pem"),
        cert=os.path.join(directory, "cluster.pem"),
        key=os.path.join(directory, "cluster-key.pem"),
    )
    _write_private(
        creds.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(creds.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(creds.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    return creds


def cluster_environment(creds: ClusterCredentials | None) -> dict[str, str]:
    """``DASK_*`` variables for libertem-server (inherited by its scheduler and workers).

    With ``creds``: mutual TLS for every comm of the cluster. Always: the scheduler's HTTP
    routes without the proxy route. Never ``require-encryption`` (it would refuse the plain
    ``tcp://`` schedulers users connect to with "Connect to existing cluster").
    """
    env = {"DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": repr(list(SCHEDULER_HTTP_ROUTES))}
    if creds is None:
        return env
    env["DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME"] = "tls"
    env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] = creds.ca_file
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = creds.cert
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = creds.key
    return env
