"""Build the release files from a clean export of HEAD and check them as users will get them.

``make release-check`` runs this with the development venv's Python (which has ``build``,
``twine``, ``jinja2``, ``pyyaml``). Steps, each printed with its time:

1. ``git archive HEAD`` into a temporary directory: only committed files, nothing ignored or
   untracked (uncommitted changes are NOT checked; a warning says so).
2. ``python -m build --sdist --wheel`` there. Node.js is needed for this step only: the
   JupyterLab extension is built with jlpm and put into both files.
3. The sdist holds the built labextension, LICENSE, CHANGELOG.md and no build debris.
4. The wheel's file list against ``tools/wheel-contents.txt``.
5. With Node.js hidden: a wheel from the sdist through ``pip wheel`` (what ``pip install``
   does from PyPI when it gets the sdist). It must equal the wheel of step 2 byte for byte.
6. With Node.js hidden: the conda-forge recipe's build script (``recipe/meta.yaml``) on the
   unpacked sdist, in a venv with only the recipe's host requirements.
7. ``twine check --strict`` on the sdist and the wheel.
8. With Node.js hidden: a fresh venv with the wheel and JupyterLab; ``jupyter server
   extension list`` and ``jupyter labextension list`` must show the extension OK.

On success ``dist/`` holds the sdist and the wheel built from it: the files to publish
(RELEASE.md). Exit status 1 and a message naming the step on the first failure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import conda_recipe
from tools.set_version import npm_version

REPO = Path(__file__).resolve().parents[1]
EXPECTED_WHEEL = REPO / "tools" / "wheel-contents.txt"
DIST_NAME = "libertem_jupyter_proxy"
LABEXT = "share/jupyter/labextensions/libertem-jupyter-proxy"
# what "Node.js installed" means to hatch-jupyter-builder and jlpm
NODE_TOOLS = frozenset(
    {"node", "nodejs", "npm", "npx", "yarn", "yarnpkg", "pnpm", "corepack", "jlpm"}
)
# present in every sdist; the labextension ones prove a wheel can be built without Node.js
SDIST_REQUIRED = (
    "LICENSE",
    "CHANGELOG.md",
    "README.md",
    "pyproject.toml",
    "labextension/package.json",
    "labextension/install.json",
    "jupyter-config/jupyter_server_config.d/libertem_jupyter_proxy.json",
    f"{DIST_NAME}/labextension/package.json",
    f"{DIST_NAME}/labextension/static/style.js",
)
SDIST_FORBIDDEN = re.compile(
    r"(^|/)(node_modules|\.venv|\.e2e|\.yarn|__pycache__|_build|dist|e2e-artifacts)(/|$)"
)


class CheckFailed(Exception):
    """One step found a problem; the message says what and where."""


def log(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def step(title: str) -> Iterator[None]:
    log(f"--- {title}")
    t0 = time.monotonic()
    yield
    log(f"    ok ({time.monotonic() - t0:.0f} s)")


def run(argv: Sequence[str | Path], **kwargs) -> str:
    """Run a command; on failure raise CheckFailed with its last output lines."""
    out = subprocess.run(
        [str(a) for a in argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )
    if out.returncode != 0:
        tail = "\n".join(out.stdout.splitlines()[-40:])
        raise CheckFailed(f"`{' '.join(map(str, argv))}` exited with {out.returncode}:\n{tail}")
    return out.stdout


# ------------------------------------------------------------------------------ environment


def path_without_node(workdir: Path) -> str:
    """A PATH with the system's programs but no Node.js tool and no virtualenv.

    Node.js lives in /usr/bin next to everything else, so PATH cannot just drop a directory:
    the programs of every non-venv PATH directory are linked into one directory, except
    ``NODE_TOOLS``.
    """
    shadow = workdir / "bin-without-node"
    shadow.mkdir()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        d = Path(entry)
        if not entry or not d.is_dir() or (d.parent / "pyvenv.cfg").exists():
            continue
        for exe in d.iterdir():
            link = shadow / exe.name
            if exe.name in NODE_TOOLS or link.exists() or link.is_symlink():
                continue
            if exe.is_file() and os.access(exe, os.X_OK):
                link.symlink_to(exe)
    found = [t for t in NODE_TOOLS if shutil.which(t, path=str(shadow))]
    if found:
        raise CheckFailed(f"could not hide Node.js tools: {found}")
    return str(shadow)


def env_without_node(shadow: str, *front: Path, home: Path | None = None) -> dict[str, str]:
    """The caller's environment with PATH = ``front`` dirs + ``shadow``, Jupyter's own
    directories and (optionally) HOME private, so the user's settings cannot leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join([*map(str, front), shadow])
    env.pop("HATCH_JUPYTER_BUILDER_SKIP_NPM", None)
    if home is not None:
        env.update(
            HOME=str(home),
            JUPYTER_CONFIG_DIR=str(home / "jupyter-config"),
            JUPYTER_DATA_DIR=str(home / "jupyter-data"),
            JUPYTER_RUNTIME_DIR=str(home / "jupyter-runtime"),
            JUPYTER_PLATFORM_DIRS="1",
        )
    return env


def make_venv(where: Path) -> Path:
    """A fresh venv from the base interpreter; returns its bin directory."""
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", where])
    return where / "bin"


# ------------------------------------------------------------------------------ the checks


def version() -> str:
    text = (REPO / DIST_NAME / "_version.py").read_text()
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not m:
        raise CheckFailed(f"no __version__ in {DIST_NAME}/_version.py")
    return m.group(1)


def export_head(dest: Path) -> None:
    """Committed files of HEAD only, as a clean clone has them."""
    dirty = run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]).strip()
    if dirty:
        log("    WARNING: uncommitted changes are not part of this check:\n" + dirty)
    archive = dest.parent / "head.tar"
    run(["git", "-C", REPO, "archive", "--format=tar", "-o", archive, "HEAD"])
    dest.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()


def sdist_names(sdist: Path) -> list[str]:
    """Member paths below the sdist's top directory (``name-version/``)."""
    with tarfile.open(sdist) as tar:
        return [m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name and m.isfile()]


def check_sdist(sdist: Path) -> None:
    names = set(sdist_names(sdist))
    missing = [n for n in SDIST_REQUIRED if n not in names]
    if missing:
        raise CheckFailed(f"{sdist.name} lacks {missing}")
    debris = sorted(n for n in names if SDIST_FORBIDDEN.search(n))
    if debris:
        raise CheckFailed(f"{sdist.name} carries build debris: {debris[:10]}")


def expected_patterns(ver: str) -> list[tuple[str, bool, re.Pattern[str]]]:
    """``tools/wheel-contents.txt`` as (line, required, regex). ``*`` matches within one path
    part, ``{version}``/``{data}`` are filled in, a leading ``?`` marks an optional file."""
    out = []
    for raw in EXPECTED_WHEEL.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        optional = line.startswith("?")
        pattern = line.lstrip("? ").format(
            version=ver, data=f"{DIST_NAME}-{ver}.data/data", labext=LABEXT
        )
        regex = "".join("[^/]*" if c == "*" else re.escape(c) for c in pattern)
        out.append((line, not optional, re.compile(regex + r"\Z")))
    return out


def check_wheel_list(names: Sequence[str], ver: str) -> None:
    """Every file matches a line of the expected list; every required line matches a file."""
    patterns = expected_patterns(ver)
    unexpected = [n for n in names if not any(rx.match(n) for _, _, rx in patterns)]
    absent = [line for line, req, rx in patterns if req and not any(rx.match(n) for n in names)]
    if unexpected or absent:
        raise CheckFailed(
            f"wheel contents differ from {EXPECTED_WHEEL.relative_to(REPO)}:\n"
            f"  files no line allows: {unexpected}\n  lines no file matches: {absent}"
        )


def wheel_digests(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as z:
        return {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist()}


def same_wheels(a: Path, b: Path) -> None:
    da, db = wheel_digests(a), wheel_digests(b)
    differ = sorted(n for n in da.keys() | db.keys() if da.get(n) != db.get(n))
    if differ:
        raise CheckFailed(
            f"the wheel built from the sdist differs from the one built from git: {differ}"
        )


def check_listings(bin_dir: Path, env: dict[str, str], ver: str, npm_ver: str) -> str:
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    server = ansi.sub("", run([bin_dir / "jupyter", "server", "extension", "list"], env=env))
    lab = ansi.sub("", run([bin_dir / "jupyter", "labextension", "list"], env=env))
    if not re.search(r"libertem_jupyter_proxy\s+enabled", server) or not re.search(
        rf"libertem_jupyter_proxy {re.escape(ver)} OK", server
    ):
        raise CheckFailed(f"jupyter server extension list does not show it OK:\n{server}")
    if not re.search(rf"libertem-jupyter-proxy v{re.escape(npm_ver)} enabled\s+OK", lab):
        raise CheckFailed(f"jupyter labextension list does not show it OK:\n{lab}")
    keep = [
        ln.strip()
        for ln in (server + lab).splitlines()
        if "libertem" in ln or "labextension" in ln.lower()
    ]
    return "\n".join("    | " + ln for ln in keep)


def run_recipe_build(recipe_dir: Path, sdist_tree: Path, workdir: Path, shadow: str) -> None:
    """The recipe's ``build: script`` on the unpacked sdist, Node.js hidden, in a venv with
    only the recipe's host requirements (conda-build's host environment, approximately)."""
    recipe = conda_recipe.render(recipe_dir)
    host_bin = make_venv(workdir / "recipe-host")
    run(
        [
            host_bin / "python",
            "-m",
            "pip",
            "install",
            "--quiet",
            *conda_recipe.host_requirements(recipe),
        ]
    )
    env = env_without_node(shadow, host_bin)
    env["PYTHON"] = str(host_bin / "python")
    run(
        ["bash", "-euo", "pipefail", "-c", conda_recipe.build_script(recipe)],
        cwd=sdist_tree,
        env=env,
    )
    prefix = host_bin.parent
    for rel in (
        f"{LABEXT}/package.json",
        "etc/jupyter/jupyter_server_config.d/libertem_jupyter_proxy.json",
    ):
        if not (prefix / rel).is_file():
            raise CheckFailed(f"the recipe's build did not install {rel}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, default=REPO / "dist", help="where the files go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    ver = version()
    head = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).strip()
    log(f"libertem-jupyter-proxy {ver} from {head}")
    t_all = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ljp-release-"))
    try:
        shadow = path_without_node(work)
        export = work / "export"
        with step("1. export HEAD (git archive)"):
            export_head(export)
        with step("2. build sdist and wheel from the export (Node.js builds the labextension)"):
            run(
                [
                    sys.executable,
                    "-m",
                    "build",
                    "--sdist",
                    "--wheel",
                    "--outdir",
                    work / "from-git",
                    export,
                ]
            )
            sdist = next((work / "from-git").glob("*.tar.gz"))
            wheel_git = next((work / "from-git").glob("*.whl"))
            log(f"    {sdist.name}, {wheel_git.name}")
        with step("3. sdist contents (built labextension, LICENSE, CHANGELOG, no debris)"):
            check_sdist(sdist)
        with step(f"4. wheel contents against {EXPECTED_WHEEL.relative_to(REPO)}"):
            with zipfile.ZipFile(wheel_git) as z:
                names = z.namelist()
            check_wheel_list(names, ver)
            log(f"    {len(names)} files")
        with step("5. wheel from the sdist with pip, Node.js hidden; same bytes as step 2"):
            env = env_without_node(shadow)
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--no-deps",
                    "--quiet",
                    "-w",
                    work / "from-sdist",
                    sdist,
                ],
                env=env,
            )
            wheel = next((work / "from-sdist").glob("*.whl"))
            same_wheels(wheel_git, wheel)
        with step("6. conda-forge recipe's build script on the sdist, Node.js hidden"):
            unpacked = work / "sdist-tree"
            unpacked.mkdir()
            with tarfile.open(sdist) as tar:
                tar.extractall(unpacked, filter="data")
            run_recipe_build(export / "recipe", next(unpacked.iterdir()), work, shadow)
        with step("7. twine check --strict"):
            plain = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
            out = run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel], env=plain)
            out = re.sub(r"\x1b\[[0-9;]*m", "", out)
            log("    " + out.strip().replace("\n", "\n    "))
        with step("8. fresh venv, Node.js hidden: pip install the wheel + jupyterlab; listings"):
            bin_dir = make_venv(work / "user-venv")
            home = work / "user-home"
            home.mkdir()
            env = env_without_node(shadow, bin_dir, home=home)
            run(
                [bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, "jupyterlab"],
                env=env,
            )
            run([bin_dir / "python", "-m", "pip", "check"], env=env)
            log(check_listings(bin_dir, env, ver, npm_version(ver)))
        args.dist.mkdir(exist_ok=True)
        for old in args.dist.glob(f"{DIST_NAME}-*"):
            old.unlink()
        for f in (sdist, wheel):
            shutil.copy2(f, args.dist / f.name)
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            log(f"dist/{f.name}  sha256 {digest}")
        if re.search(r"(dev|a|b|rc)\d+$", ver):
            log(f"note: {ver} is a pre-release; RELEASE.md says how to set the release version")
        log(f"release check passed in {time.monotonic() - t_all:.0f} s")
        return 0
    except CheckFailed as e:
        log(f"RELEASE CHECK FAILED: {e}")
        return 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
