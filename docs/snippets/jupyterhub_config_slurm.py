# jupyterhub_config.py (excerpt): user servers as Slurm jobs through batchspawner.
c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)

c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
c.SlurmSpawner.req_partition = "interactive"
c.SlurmSpawner.req_nprocs = "8"  # CPUs of the job: the wrapper starts this many workers
c.SlurmSpawner.req_memory = "32G"
c.SlurmSpawner.req_runtime = "8:00:00"
# LiberTEM through the site's module system (libertem-wrapper.sh), passed to each user server
c.Spawner.args = [
    "--LiberTEMProxy.libertem_server_path=/opt/site/bin/libertem-wrapper.sh",
    "--LiberTEMProxy.idle_timeout=3600",
]
