# jupyterhub_config.py (excerpt): each user server is a Slurm job (batchspawner 1.3.0,
# JupyterHub 6.1.1); LiberTEM comes from the module system through a wrapper script.
# @JUPYTER_ENV@: the environment with jupyterhub-singleuser, batchspawner and the proxy;
# @MODULEPATH@: the directory holding libertem/0.16.0.lua; @WRAPPER@: libertem-wrapper.sh.
c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)

c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
c.SlurmSpawner.req_nprocs = "1"  # --cpus-per-task: LiberTEM's GUI proposes this many workers
c.SlurmSpawner.req_memory = "2G"  # Jupyter + libertem-server + its service worker + 1 worker
c.SlurmSpawner.req_runtime = "1:00:00"
# In the job: the Jupyter environment on PATH, Lmod and the site's module path. (JupyterHub 6
# keeps almost nothing of the hub's environment, and batchspawner's `--export=<list>` would
# not pass PATH.)
c.SlurmSpawner.req_prologue = """
export PATH=@JUPYTER_ENV@/bin:$PATH
source /etc/profile.d/lmod.sh
module use @MODULEPATH@
"""
# sbatch --export=<list> leaves SLURM_EXPORT_ENV=<list> in the job: without --export=ALL the
# srun step would drop what the prologue set.
c.SlurmSpawner.req_srun = "srun --export=ALL"
# A job that dies after Slurm said RUNNING keeps the hub waiting this long.
c.SlurmSpawner.start_timeout = 120

# LiberTEM through the wrapper; the proxy sizes its workers to the job (c.LiberTEMProxy.cpus)
c.Spawner.args = ["--LiberTEMProxy.libertem_server_path=@WRAPPER@"]
