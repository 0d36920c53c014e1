#!/bin/bash
# Start libertem-server from the site's module system (HPC), for libertem-jupyter-proxy.
# Point libertem_server_path (or the JSON file) at this script; the proxy passes its own
# options (--no-browser --host --port --token-path --local-directory) as arguments.
set -euo pipefail

# Lmod and Environment Modules export `module` to child shells; if they did not, load it.
if ! command -v module >/dev/null 2>&1; then
    source /etc/profile.d/modules.sh
fi
module load libertem/0.16.0

# exec: libertem-server replaces this shell, so the proxy's stop signal reaches it directly.
# One dask worker per CPU of the batch job (1 outside of Slurm); "$@" passes the proxy's options.
exec libertem-server --cpus="${SLURM_CPUS_PER_TASK:-1}" "$@"
