"""The per-start keys of LiberTEM's dask cluster (issue 14): files, modes, chain, environment,
and a real dask scheduler that refuses everybody without them."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from libertem_jupyter_proxy import backend_run, dask_tls


@pytest.fixture
def run_dir() -> Iterator[str]:
    tmpdir, _token, _path = backend_run.new_run_dir()
    yield tmpdir
    import shutil

    shutil.rmtree(tmpdir, ignore_errors=True)


def test_credentials_are_private_and_chain_to_a_ca_without_stored_key(run_dir):
    creds = dask_tls.make_credentials(run_dir)
    assert stat.S_IMODE(os.stat(creds.directory).st_mode) == 0o700
    assert sorted(os.listdir(creds.directory)) == ["ca.pem", "cluster-key.pem", "cluster.pem"]
    for path in (creds.ca_file, creds.cert, creds.key):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(creds.ca_file, "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(creds.cert, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(creds.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert key.public_key() == cert.public_key()
    assert ca.public_key() != cert.public_key()  # the only key on disk is not the CA's
    # each start gets new keys
    other_dir = os.path.join(run_dir, "next-start")
    os.mkdir(other_dir, 0o700)
    other = dask_tls.make_credentials(other_dir)
    with open(other.ca_file, "rb") as f:
        assert x509.load_pem_x509_certificate(f.read()) != ca


def test_existing_files_are_never_overwritten(run_dir):
    dask_tls.make_credentials(run_dir)
    with pytest.raises(FileExistsError):
        dask_tls.make_credentials(run_dir)


def test_environment_as_dask_reads_it(run_dir):
    dask_config = pytest.importorskip("dask.config")
    creds = dask_tls.make_credentials(run_dir)
    env = backend_run.cluster_environment(run_dir + "-unused", tls=False)
    assert "DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME" not in env
    env = dask_tls.cluster_environment(creds)
    parsed = dask_config.collect_env(env)["distributed"]
    assert parsed["comm"]["default_scheme"] == "tls"
    tls = parsed["comm"]["tls"]
    assert tls["ca_file"] == creds.ca_file
    for role in ("scheduler", "worker", "client"):
        assert tls[role] == {"cert": creds.cert, "key": creds.key}
    assert "require_encryption" not in parsed["comm"]  # tcp:// clusters keep working
    routes = parsed["scheduler"]["http"]["routes"]
    assert "distributed.http.proxy" not in routes
    assert "distributed.http.scheduler.info" not in routes  # worker logs, call stacks
    assert "distributed.http.health" in routes


# ---------------------------------------------------------------- a real dask scheduler

_CLIENT = """
import os, sys
from distributed import Client
try:
    with Client(sys.argv[1], timeout=8) as c:
        print("RAN", c.run_on_scheduler(os.getpid), flush=True)
except Exception as e:
    print("REFUSED", type(e).__name__, e, flush=True)
"""


def _scheduler(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host=127.0.0.1",
            "--port=0",
            "--no-dashboard",
            "--no-show",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"Scheduler at:\s+(\S+)", line)
        if m:
            return proc, m.group(1)
    raise AssertionError(f"scheduler exited with {proc.wait()}")


def _client(address: str, env: dict[str, str]) -> str:
    r = subprocess.run(
        [sys.executable, "-c", _CLIENT, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.stdout.strip()


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}


@pytest.mark.slow
def test_real_scheduler_only_serves_holders_of_the_run_keys(run_dir, tmp_path):
    pytest.importorskip("distributed")
    creds = dask_tls.make_credentials(run_dir)
    owner_env = {**_clean_env(), **dask_tls.cluster_environment(creds)}
    proc, address = _scheduler(owner_env)
    try:
        assert address.startswith("tls://")
        port = address.rsplit(":", 1)[1]
        assert _client(address, owner_env).startswith("RAN")
        # no keys at all: plain tcp to the same port, and tls without a certificate
        assert _client(f"tcp://127.0.0.1:{port}", _clean_env()).startswith("REFUSED")
        assert _client(address, _clean_env()).startswith("REFUSED")
        # keys of another start (another CA) do not fit either
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        stranger = {
            **_clean_env(),
            **dask_tls.cluster_environment(dask_tls.make_credentials(str(other_dir))),
        }
        assert _client(address, stranger).startswith("REFUSED")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_plain_tcp_cluster_still_reachable_with_the_tls_environment(run_dir):
    """ "Connect to existing cluster" with a tcp:// scheduler: the TLS defaults must not force
    encryption on it (control: the same scheduler also takes a client without any keys)."""
    pytest.importorskip("distributed")
    proc, address = _scheduler(_clean_env())
    try:
        assert address.startswith("tcp://")
        owner_env = {
            **_clean_env(),
            **dask_tls.cluster_environment(dask_tls.make_credentials(run_dir)),
        }
        assert _client(address, owner_env).startswith("RAN")
        assert _client(address, _clean_env()).startswith("RAN")
    finally:
        proc.kill()
        proc.wait()


def test_dask_scratch_space_is_in_the_run_directory(tmp_path):
    """dask's temporary directory (the scheduler's scratch space, first on the workers'
    sys.path) is the run's private directory, never a shared /tmp, with TLS on or off."""
    from libertem_jupyter_proxy.backend_run import cluster_environment

    for tls in (True, False):
        run_dir = tmp_path / f"run-{tls}"
        run_dir.mkdir(mode=0o700)
        env = cluster_environment(str(run_dir), tls)
        assert env["DASK_TEMPORARY_DIRECTORY"] == str(run_dir)
