# jupyterhub_config.py (test only): what the HPC test's one-machine cluster adds to the site
# part. A real cluster (hub on a login node, jobs on compute nodes, sudo) needs none of this.
import batchspawner
from traitlets import Unicode

c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)


class LoopbackSlurmSpawner(batchspawner.SlurmSpawner):
    """The job runs on the hub's machine: its server listens on 127.0.0.1, where the hub is.

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
