#!/bin/bash
# Start libertem-server from the site's module system (HPC), for libertem-jupyter-proxy.
# Point libertem_server_path (or the JSON file) at this script; the proxy passes its own
# options (--no-browser --host --port --token-path --local-directory) as arguments.
set -euo pipefail

# Lmod exports `module` to child shells; if it did not (a clean environment), load it.
if ! command -v module >/dev/null 2>&1; then
    source /etc/profile.d/lmod.sh
fi
module load libertem/0.16.0

# exec: libertem-server replaces this shell, so the proxy's stop signal reaches it directly.
# No --cpus: the GUI proposes as many workers as the job has CPUs (c.LiberTEMProxy.cpus).
exec libertem-server "$@"
