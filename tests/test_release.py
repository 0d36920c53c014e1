"""What a release carries and promises: the license, the changelog, the version in step, the
conda-forge recipe in step with pyproject.toml, the sdist able to build a wheel without Node.js,
and ``make demo`` installing the demo and nothing else.

The full build-and-install check is ``make release-check`` (tools/release_check.py); these
tests hold the pieces it relies on.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib

from libertem_jupyter_proxy import __version__
from tools import conda_recipe, release_check
from tools.set_version import npm_version, set_version

from .dists import Dists, build_dists

REPO = Path(__file__).resolve().parents[1]
BASE_VERSION = re.match(r"\d+\.\d+\.\d+", __version__).group(0)  # type: ignore[union-attr]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    return build_dists(tmp_path_factory.mktemp("dists"))


# ------------------------------------------------------------------------------ license


def test_license_is_mit_and_declared():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 LiberTEM developers" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]


# ------------------------------------------------------------------------------ version, changelog


def test_changelog_starts_with_this_version():
    first = next(
        ln for ln in (REPO / "CHANGELOG.md").read_text().splitlines() if ln.startswith("## ")
    )
    assert re.match(rf"## {re.escape(BASE_VERSION)} \(", first), (first, __version__)


def test_set_version_writes_both_files(tmp_path: Path):
    version_py = tmp_path / "_version.py"
    package_json = tmp_path / "package.json"
    shutil.copy(REPO / "libertem_jupyter_proxy" / "_version.py", version_py)
    shutil.copy(REPO / "labextension" / "package.json", package_json)
    set_version("1.4.0rc2", version_py, package_json)
    assert version_py.read_text() == '__version__ = "1.4.0rc2"\n'
    assert '"version": "1.4.0-rc.2",' in package_json.read_text()
    assert npm_version("0.2.0.dev0") == "0.2.0-dev.0"
    assert npm_version("0.2.0") == "0.2.0"
    with pytest.raises(SystemExit):
        set_version("0.2", version_py, package_json)


# ------------------------------------------------------------------------------ conda-forge recipe


def test_recipe_run_requirements_match_pyproject():
    """Every ``[project] dependencies`` entry is a ``run`` requirement with the same bounds,
    and nothing else is (python compared with requires-python)."""
    differences = conda_recipe.run_requirement_differences(conda_recipe.render())
    assert differences == [], "recipe/meta.yaml and pyproject.toml disagree:\n" + "\n".join(
        differences
    )


def test_recipe_requirement_comparison_sees_a_difference():
    recipe = conda_recipe.render()
    run = recipe["requirements"]["run"]
    run[run.index("aiohttp >=3.9")] = "aiohttp >=3.8"
    run.append("jupyter-server-proxy")
    differences = conda_recipe.run_requirement_differences(recipe)
    assert any(d.startswith("aiohttp:") for d in differences), differences
    assert any("jupyter-server-proxy" in d for d in differences), differences


def test_recipe_python_min_is_requires_python():
    assert conda_recipe.recipe_python_min() == conda_recipe.requires_python_min()


def test_recipe_host_requirements_are_the_python_build_requirements():
    """The recipe builds with hatchling and hatch-jupyter-builder at the bounds pyproject.toml
    asks for; jupyter-builder (the Node.js toolchain) is deliberately absent."""
    recipe = conda_recipe.render()
    host = {
        conda_recipe.normalize(re.split(r"[<>=!]", r, maxsplit=1)[0]): r
        for r in conda_recipe.host_requirements(recipe)
    }
    build = {
        conda_recipe.normalize(re.split(r"[<>=!]", r, maxsplit=1)[0]): r.replace(" ", "")
        for r in _pyproject()["build-system"]["requires"]
    }
    assert set(host) == set(build) - {"jupyter-builder"}, (host, build)
    for name, req in host.items():
        assert req.replace("_", "-") == build[name].replace("_", "-"), (req, build[name])


def test_recipe_builds_from_sdist_without_node():
    recipe = conda_recipe.render()
    assert recipe["build"]["noarch"] == "python"
    script = conda_recipe.build_script(recipe)
    assert "HATCH_JUPYTER_BUILDER_SKIP_NPM=1" in script
    assert "--no-deps" in script and "--no-build-isolation" in script
    host = {re.split(r"[<>=!]", r, maxsplit=1)[0] for r in conda_recipe.host_requirements(recipe)}
    assert host.isdisjoint({"nodejs", "yarn", "jupyter-builder"}), host
    # the hook must still refuse a wheel without the built frontend
    ensured = _pyproject()["tool"]["hatch"]["build"]["hooks"]["jupyter-builder"]["ensured-targets"]
    assert "libertem_jupyter_proxy/labextension/package.json" in ensured


def test_recipe_names_this_version_and_license():
    recipe = conda_recipe.render()
    assert recipe["package"]["version"] == BASE_VERSION
    assert recipe["package"]["name"] == _pyproject()["project"]["name"]
    assert recipe["about"]["license"] == _pyproject()["project"]["license"]
    assert recipe["about"]["license_file"] == "LICENSE"
    assert recipe["source"]["url"].endswith(f"/libertem_jupyter_proxy-{BASE_VERSION}.tar.gz")


# ------------------------------------------------------------------------------ make demo


def test_make_demo_installs_only_the_demo(tmp_path: Path):
    """``make demo`` (dry run) installs the package, JupyterLab, Notebook and LiberTEM; no
    test, lint, docs or release extras."""
    out = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [ln for ln in out.splitlines() if " pip install" in ln]
    assert installs, out
    words = " ".join(installs).split()
    for wanted in ("jupyterlab", "notebook", "libertem"):
        assert wanted in words, (wanted, installs)
    assert "[" not in " ".join(installs), installs
    assert "jupyter lab" in out


# ------------------------------------------------------------------------------ wheel list rules


def _names(version: str) -> list[str]:
    data = f"libertem_jupyter_proxy-{version}.data/data"
    labext = f"{data}/share/jupyter/labextensions/libertem-jupyter-proxy"
    info = f"libertem_jupyter_proxy-{version}.dist-info"
    return [
        "libertem_jupyter_proxy/__init__.py",
        "libertem_jupyter_proxy/_version.py",
        "libertem_jupyter_proxy/extension.py",
        "libertem_jupyter_proxy/guard.py",
        "libertem_jupyter_proxy/templates/loading.html",
        "libertem_jupyter_proxy/templates/error.html",
        f"{data}/etc/jupyter/jupyter_server_config.d/libertem_jupyter_proxy.json",
        f"{labext}/package.json",
        f"{labext}/install.json",
        f"{labext}/schemas/libertem-jupyter-proxy/plugin.json",
        f"{labext}/schemas/libertem-jupyter-proxy/package.json.orig",
        f"{labext}/static/remoteEntry.0123abcd.js",
        f"{labext}/static/style.js",
        f"{labext}/static/third-party-licenses.json",
        f"{info}/METADATA",
        f"{info}/WHEEL",
        f"{info}/RECORD",
        f"{info}/licenses/LICENSE",
    ]


def test_wheel_list_rules():
    names = _names("9.8.7")
    release_check.check_wheel_list(names, "9.8.7")
    with pytest.raises(release_check.CheckFailed, match="licenses/LICENSE"):
        release_check.check_wheel_list([n for n in names if "LICENSE" not in n], "9.8.7")
    with pytest.raises(release_check.CheckFailed, match=r"tests/conftest\.py"):
        release_check.check_wheel_list([*names, "tests/conftest.py"], "9.8.7")
    with pytest.raises(release_check.CheckFailed, match="node_modules"):
        release_check.check_wheel_list(
            [*names, "libertem_jupyter_proxy/labextension/node_modules/x/index.js"], "9.8.7"
        )


# ------------------------------------------------------------------------------ built files


@pytest.mark.slow
def test_sdist_carries_built_labextension_and_license(dists: Dists):
    """A wheel can be built from the sdist without Node.js only if the built frontend is in it
    (``make release-check`` then builds one with Node.js hidden)."""
    release_check.check_sdist(dists.sdist)
    with tarfile.open(dists.sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        built = tar.extractfile(f"{top}/libertem_jupyter_proxy/labextension/package.json")
        assert built is not None and b'"_build"' in built.read()


@pytest.mark.slow
def test_wheel_matches_expected_list_and_carries_license(dists: Dists):
    with zipfile.ZipFile(dists.wheel) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{info}/METADATA").decode()
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
    release_check.check_wheel_list(names, __version__)
    assert license_text == (REPO / "LICENSE").read_text()
    assert "License-Expression: MIT" in metadata
    assert "License-File: LICENSE" in metadata
