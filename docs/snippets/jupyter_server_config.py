# jupyter_server_config.py: options of libertem-jupyter-proxy (all optional).
c = get_config()  # noqa: F821 (provided by Jupyter when it loads this file)

# Where libertem-server is, if it is not on Jupyter's PATH (here: a separate environment).
c.LiberTEMProxy.libertem_server_path = "/opt/libertem/venv/bin/libertem-server"

# Start a local dask cluster with 4 workers right away, instead of asking in the GUI.
c.LiberTEMProxy.extra_args = ["--cpus=4"]

# Big environments on slow shared file systems can take longer than 90 s to start.
c.LiberTEMProxy.start_timeout = 180

# Give the memory back after an hour without use; the next visit starts LiberTEM again.
c.LiberTEMProxy.idle_timeout = 3600
