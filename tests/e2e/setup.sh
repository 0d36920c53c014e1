#!/usr/bin/env bash
# Idempotent setup for the real-world end-to-end tests (tests/e2e/), called by `make test-e2e`.
#
# Creates, below .e2e/ in the repository (override with E2E_DIR):
#   libertem-venv/  LiberTEM alone, in its own environment (what the proxy must find through
#                   etc/libertem_jupyter_proxy.json, not through PATH)
#   jupyter-venv/   JupyterHub + JupyterLab + this package (editable), and NO LiberTEM: the
#                   environment the hub and the user servers run from
#   node/           configurable-http-proxy from npm, in a local prefix (never installed globally)
# Each part is rebuilt only when its stamp (the requirements it was built from) changes.
# System packages (Debian: nginx, chromium) are checked here, installed by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
E2E_DIR=${E2E_DIR:-$REPO/.e2e}
PYTHON=${PYTHON:-python3}

LIBERTEM_REQ=("libertem==0.16.*")
JUPYTER_REQ=("jupyterhub>=6,<7" "jupyterlab>=4.2,<5")
CHP_REQ="configurable-http-proxy@5"

mkdir -p "$E2E_DIR"
say() { echo "e2e-setup: $*"; }

stamp_ok() {  # stamp_ok <file> <content>: the part was built from exactly <content>
  [[ -f $1 ]] && [[ "$(cat "$1")" == "$2" ]]
}

# 1. LiberTEM in its own virtual environment
lt=$E2E_DIR/libertem-venv
lt_stamp="${LIBERTEM_REQ[*]} $($PYTHON -c 'import sys; print(sys.version.split()[0])')"
if ! stamp_ok "$lt/.e2e-stamp" "$lt_stamp" || [[ ! -x $lt/bin/libertem-server ]]; then
  say "creating $lt (${LIBERTEM_REQ[*]})"
  rm -rf "$lt"
  "$PYTHON" -m venv "$lt"
  "$lt/bin/python" -m pip install --quiet --upgrade pip
  "$lt/bin/python" -m pip install --quiet "${LIBERTEM_REQ[@]}"
  echo "$lt_stamp" > "$lt/.e2e-stamp"
fi
"$lt/bin/python" -c 'import libertem; print("e2e-setup: LiberTEM", libertem.__version__)'
# numba's on-disk cache inside the venv: compile once here, not in every test run
if [[ ! -f $lt/.e2e-warm ]]; then
  say "filling LiberTEM's numba cache (once, ~1 min)"
  "$lt/bin/python" tests/e2e/warm_libertem.py
  touch "$lt/.e2e-warm"
fi

# 2. the Jupyter environment: hub, lab and this package, without LiberTEM
jv=$E2E_DIR/jupyter-venv
jv_stamp="${JUPYTER_REQ[*]} $(sha256sum pyproject.toml | cut -c1-16)"
if ! stamp_ok "$jv/.e2e-stamp" "$jv_stamp" || [[ ! -x $jv/bin/jupyterhub-singleuser ]]; then
  say "creating $jv (${JUPYTER_REQ[*]} + -e $REPO)"
  rm -rf "$jv"
  "$PYTHON" -m venv "$jv"
  "$jv/bin/python" -m pip install --quiet --upgrade pip
  "$jv/bin/python" -m pip install --quiet "${JUPYTER_REQ[@]}" -e "$REPO"
  echo "$jv_stamp" > "$jv/.e2e-stamp"
fi
if "$jv/bin/python" -c 'import libertem' 2>/dev/null || [[ -e $jv/bin/libertem-server ]]; then
  echo "e2e-setup: $jv must not contain LiberTEM (the tests prove the separate-environment setup)" >&2
  exit 1
fi
# (captured first: `grep -q` in a pipe would end jupyter early, and pipefail would count that)
ext=$("$jv/bin/jupyter" server extension list 2>&1)
grep "libertem_jupyter_proxy" <<<"$ext" | grep -q "OK" \
  || { echo "e2e-setup: libertem_jupyter_proxy is not enabled in $jv:" >&2; echo "$ext" >&2; exit 1; }
labext=$("$jv/bin/jupyter" labextension list 2>&1)
grep -q "libertem-jupyter-proxy" <<<"$labext" \
  || { echo "e2e-setup: the labextension is not installed in $jv:" >&2; echo "$labext" >&2; exit 1; }

# 3. configurable-http-proxy (npm) in a local prefix
chp=$E2E_DIR/node/node_modules/.bin/configurable-http-proxy
if ! stamp_ok "$E2E_DIR/node/.e2e-stamp" "$CHP_REQ" || [[ ! -x $chp ]]; then
  say "installing $CHP_REQ into $E2E_DIR/node"
  npm install --silent --no-audit --no-fund --prefix "$E2E_DIR/node" "$CHP_REQ"
  echo "$CHP_REQ" > "$E2E_DIR/node/.e2e-stamp"
fi
say "configurable-http-proxy $("$chp" --version)"

# 4. system packages
for exe in /usr/sbin/nginx /usr/bin/chromium; do
  [[ -x $exe ]] || { echo "e2e-setup: $exe missing (apt-get install nginx chromium)" >&2; exit 1; }
done
say "ready in $E2E_DIR"
