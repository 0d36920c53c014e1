#!/bin/bash
# The status and control API of libertem-jupyter-proxy, from a terminal or a script.
#   JUPYTER_URL    the Jupyter server's URL including its base_url, for example
#                  http://127.0.0.1:8888/ or https://hub.example.org/user/alice/
#   JUPYTER_TOKEN  a Jupyter token (or, under JupyterHub, an API token of the user)
set -euo pipefail
API="${JUPYTER_URL%/}/libertem-proxy/api"
AUTH="Authorization: token $JUPYTER_TOKEN"

curl -sSf -H "$AUTH" "$API/status"; echo           # state, pid, uptime, crashes, last error
curl -sSf -H "$AUTH" -X POST "$API/start"; echo    # start now; also forgets earlier crashes
curl -sSf -H "$AUTH" "$API/log?lines=20"; echo     # the last 20 lines LiberTEM wrote
curl -sSf -H "$AUTH" -X POST "$API/restart"; echo  # stop, then start again
curl -sSf -H "$AUTH" -X POST "$API/stop"; echo     # graceful stop; the next visit starts it
