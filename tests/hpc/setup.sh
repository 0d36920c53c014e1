#!/usr/bin/env bash
# Idempotent setup for the HPC end-to-end test (tests/hpc/), called by `make test-hpc`.
#
# The user servers run as a Unix test user inside Slurm jobs, so everything they run must be
# readable by that user: not below /root (pyenv) and not an editable install of a checkout
# that may live there. Below $HPC_DIR (default /opt/ltjp-hpc, mode 755):
#   libertem-venv/  LiberTEM 0.16 alone (the "module" the wrapper loads), numba cache filled
#   numba-cache/    that cache (NUMBA_CACHE_DIR, set by the module file)
#   jupyter-venv/   JupyterHub 6.1.1 + batchspawner 1.3.0 + JupyterLab + this package (a wheel
#                   built from the checkout, reinstalled when the package's sources change)
#   node/           configurable-http-proxy from npm
# All venvs are made with Debian's /usr/bin/python3. System packages (slurmctld, slurmd,
# slurm-client, munge, lmod, chromium) are installed by .ci/run and only checked here.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
HPC_DIR=${HPC_DIR:-/opt/ltjp-hpc}
PYTHON=/usr/bin/python3

LIBERTEM_REQ=("libertem==0.16.*")
JUPYTER_REQ=("jupyterhub==6.1.1" "batchspawner==1.3.0" "jupyterlab>=4.2,<5")
CHP_REQ="configurable-http-proxy@5"

say() { echo "hpc-setup: $*"; }
stamp_ok() { [[ -f $1 ]] && [[ "$(cat "$1")" == "$2" ]]; }

umask 022
mkdir -p "$HPC_DIR"
chmod 755 "$HPC_DIR"

for exe in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged \
  /usr/share/lmod/lmod/init/bash /usr/sbin/ip /usr/bin/unshare; do
  [[ -e $exe ]] || { echo "hpc-setup: $exe missing (.ci/run installs slurmctld slurmd slurm-client munge lmod chromium iproute2)" >&2; exit 1; }
done

# 1. LiberTEM in its own environment, with a filled numba cache: a cold cache costs a minute
#    or more of compilation in the first analysis. numba uses a cache directory only if it can
#    write to it, so the (test-only) cache is made writable for the test user (umask 0).
lt=$HPC_DIR/libertem-venv
lt_stamp="${LIBERTEM_REQ[*]} $($PYTHON -c 'import sys; print(sys.version.split()[0])')"
if ! stamp_ok "$lt/.hpc-stamp" "$lt_stamp" || [[ ! -x $lt/bin/libertem-server ]]; then
  say "creating $lt (${LIBERTEM_REQ[*]})"
  rm -rf "$lt" "$HPC_DIR/numba-cache"
  "$PYTHON" -m venv "$lt"
  "$lt/bin/python" -m pip install --quiet --upgrade pip
  "$lt/bin/python" -m pip install --quiet "${LIBERTEM_REQ[@]}"
  echo "$lt_stamp" > "$lt/.hpc-stamp"
fi
if [[ ! -f $HPC_DIR/numba-cache/.hpc-warm ]]; then
  say "filling LiberTEM's numba cache in $HPC_DIR/numba-cache (once, ~1 min)"
  mkdir -p "$HPC_DIR/numba-cache"
  (umask 0; cd /tmp && NUMBA_CACHE_DIR=$HPC_DIR/numba-cache "$lt/bin/python" "$REPO/tests/e2e/warm_libertem.py")
  chmod -R a+rwX "$HPC_DIR/numba-cache"
  touch "$HPC_DIR/numba-cache/.hpc-warm"
fi

# 2. the Jupyter environment: hub, batchspawner, lab and this package (no LiberTEM)
jv=$HPC_DIR/jupyter-venv
jv_stamp="${JUPYTER_REQ[*]}"
if ! stamp_ok "$jv/.hpc-stamp" "$jv_stamp" || [[ ! -x $jv/bin/batchspawner-singleuser ]]; then
  say "creating $jv (${JUPYTER_REQ[*]})"
  rm -rf "$jv"
  "$PYTHON" -m venv "$jv"
  "$jv/bin/python" -m pip install --quiet --upgrade pip
  "$jv/bin/python" -m pip install --quiet "${JUPYTER_REQ[@]}"
  echo "$jv_stamp" > "$jv/.hpc-stamp"
fi
pkg_stamp=$(cd "$REPO" && find libertem_jupyter_proxy jupyter-config pyproject.toml -type f \
  -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
if ! stamp_ok "$jv/.hpc-pkg-stamp" "$pkg_stamp"; then
  say "installing this package into $jv (a wheel of $REPO)"
  "$jv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$REPO"
  "$jv/bin/python" -m pip install --quiet "$REPO"  # its dependencies, if new ones appeared
  echo "$pkg_stamp" > "$jv/.hpc-pkg-stamp"
fi
if "$jv/bin/python" -c 'import libertem' 2>/dev/null; then
  echo "hpc-setup: $jv must not contain LiberTEM (the module system provides it)" >&2
  exit 1
fi

# 3. configurable-http-proxy (npm) in a local prefix
chp=$HPC_DIR/node/node_modules/.bin/configurable-http-proxy
if ! stamp_ok "$HPC_DIR/node/.hpc-stamp" "$CHP_REQ" || [[ ! -x $chp ]]; then
  say "installing $CHP_REQ into $HPC_DIR/node"
  npm install --silent --no-audit --no-fund --prefix "$HPC_DIR/node" "$CHP_REQ"
  echo "$CHP_REQ" > "$HPC_DIR/node/.hpc-stamp"
fi
chmod -R a+rX "$HPC_DIR"
say "ready in $HPC_DIR"
