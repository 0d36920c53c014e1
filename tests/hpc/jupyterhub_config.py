# Test-only part of the HPC test's jupyterhub_config.py (tests/hpc/conftest.py). It loads the
# site configuration the docs show (docs/snippets/jupyterhub_config_slurm.py, placeholders
# filled in), then adds what a one-machine cluster in a network namespace needs.
import os

import batchspawner
from traitlets import Unicode

c = get_config()  # noqa: F821
env = os.environ
load_subconfig(env["LTJP_HPC_SITE_CONFIG"])  # noqa: F821


class LoopbackSlurmSpawner(batchspawner.SlurmSpawner):
    """The job runs on this machine: its server listens where the hub is, on 127.0.0.1.

    batchspawner 1.3.0's start() resets ``ip`` to the trait's class default (so
    ``c.SlurmSpawner.ip`` is ignored), and takes the host from squeue's node name.
    """

    ip = Unicode("127.0.0.1")

    def state_gethost(self) -> str:
        return "127.0.0.1"


c.JupyterHub.spawner_class = LoopbackSlurmSpawner
# The hub runs as root and there is no sudo: run sbatch/squeue/scancel as the user with runuser.
c.SlurmSpawner.exec_prefix = "runuser -u {username} --"
# The test's slurm.conf is not in /etc/slurm: sbatch, and srun inside the job, need SLURM_CONF.
c.Spawner.env_keep = ["SLURM_CONF", "LANG"]

c.JupyterHub.bind_url = "http://127.0.0.1:8000"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:8081"
c.ConfigurableHTTPProxy.command = [env["LTJP_HPC_CHP"]]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:8001"
state = env["LTJP_HPC_HUB_DIR"]
c.ConfigurableHTTPProxy.pid_file = f"{state}/chp.pid"
c.JupyterHub.pid_file = f"{state}/hub.pid"
c.JupyterHub.db_url = f"sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{state}/cookie_secret"
c.JupyterHub.cleanup_servers = True

c.JupyterHub.authenticator_class = "dummy"
c.SharedPasswordAuthenticator.user_password = env["LTJP_HPC_PASSWORD"]
c.Authenticator.allowed_users = {env["LTJP_HPC_USER"]}
# a test-only admin service: starts and stops servers through the REST API
c.JupyterHub.services = [{"name": "hpc-test", "api_token": env["LTJP_HPC_SERVICE_TOKEN"]}]
c.JupyterHub.load_roles = [
    {
        "name": "hpc-test",
        "services": ["hpc-test"],
        "scopes": ["admin:users", "admin:servers", "tokens", "access:servers", "read:users"],
    }
]
