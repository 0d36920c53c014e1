"""Read ``recipe/meta.yaml`` (the conda-forge recipe) the way conda-build sees it, enough to
compare it with ``pyproject.toml``.

conda-build renders the recipe with Jinja2 before parsing it as YAML; conda-forge's global
pinning supplies ``python_min`` (CFEP-25, the oldest Python a ``noarch: python`` package is
built and tested with). Only what this recipe uses is provided here; an unknown variable is an
error, not an empty string, so a recipe change that needs more is noticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
RECIPE_DIR = REPO / "recipe"
PYPROJECT = REPO / "pyproject.toml"

# PyPI name -> conda-forge name where they differ after normalisation (none so far; add here)
CONDA_NAMES: dict[str, str] = {}


def normalize(name: str) -> str:
    """PEP 503 normalisation; conda-forge names compare the same way (``jupyter_server`` and
    ``jupyter-server`` are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class CondaRequirement:
    """One line of a recipe's requirements: ``name [version spec]``."""

    name: str
    spec: SpecifierSet

    @classmethod
    def parse(cls, line: str) -> CondaRequirement:
        """``"jupyter_server >=2.13,<3"`` -> name ``jupyter-server``, spec ``>=2.13,<3``.

        Raises ValueError for conda's own spec forms (``1.2.*``, build strings, ``|``), which
        have no PEP 440 equivalent here.
        """
        parts = line.split(None, 1)
        spec = parts[1].replace(" ", "") if len(parts) > 1 else ""
        if any(c in spec for c in "|*") or re.search(r"\s", spec):
            raise ValueError(f"conda spec not comparable with PEP 440: {line!r}")
        return cls(normalize(parts[0]), SpecifierSet(spec))


def recipe_python_min(recipe_dir: Path = RECIPE_DIR) -> str:
    """``python_min`` from ``recipe/conda_build_config.yaml`` (overrides conda-forge's)."""
    values = yaml.safe_load((recipe_dir / "conda_build_config.yaml").read_text())["python_min"]
    if len(values) != 1:
        raise ValueError(f"conda_build_config.yaml: one python_min expected, got {values}")
    return str(values[0])


def render(recipe_dir: Path = RECIPE_DIR) -> dict:
    """``recipe_dir/meta.yaml`` as conda-build would parse it after rendering, with
    ``python_min`` from ``conda_build_config.yaml`` beside it. ``PYTHON`` renders as the
    literal ``$PYTHON``."""
    python_min = recipe_python_min(recipe_dir)
    path = recipe_dir / "meta.yaml"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.from_string(path.read_text()).render(python_min=python_min, PYTHON="$PYTHON")
    return yaml.safe_load(text)


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def requires_python_min() -> str:
    """``requires-python = ">=3.10"`` -> ``"3.10"``; other forms are a ValueError."""
    spec = pyproject()["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+\.\d+)", spec.strip())
    if not m:
        raise ValueError(f"requires-python {spec!r} is not of the form '>=X.Y'")
    return m.group(1)


def pyproject_run_requirements() -> dict[str, SpecifierSet]:
    """``[project] dependencies`` by conda name. Environment markers are refused: the recipe is
    ``noarch: python`` and cannot express them."""
    out: dict[str, SpecifierSet] = {}
    for line in pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        if req.marker is not None:
            raise ValueError(f"dependency with a marker cannot go into a noarch recipe: {line!r}")
        name = normalize(req.name)
        out[CONDA_NAMES.get(name, name)] = req.specifier
    return out


def recipe_run_requirements(recipe: dict) -> dict[str, SpecifierSet]:
    """``requirements: run`` by name, without ``python`` (compared with requires-python)."""
    reqs = (CondaRequirement.parse(line) for line in recipe["requirements"]["run"])
    return {r.name: r.spec for r in reqs if r.name != "python"}


def build_script(recipe: dict) -> str:
    """The ``build: script`` line (a string; conda-build runs it with bash on Linux)."""
    script = recipe["build"]["script"]
    return script if isinstance(script, str) else " && ".join(script)


def host_requirements(recipe: dict) -> list[str]:
    """``requirements: host`` without python and pip, as pip requirement strings."""
    lines = recipe["requirements"]["host"]
    kept = (line for line in lines if normalize(line.split()[0]) not in ("python", "pip"))
    return [f"{r.name}{r.spec}" for r in map(CondaRequirement.parse, kept)]


def run_requirement_differences(recipe: dict) -> list[str]:
    """What the recipe's ``run`` section gets wrong against ``pyproject.toml``, one message per
    package (empty when they agree). Python is compared with ``requires-python``."""
    want = pyproject_run_requirements()
    have = recipe_run_requirements(recipe)
    out = [f"missing in recipe run: {n} {want[n]}" for n in sorted(want.keys() - have.keys())]
    out += [f"not in pyproject dependencies: {n} {have[n]}" for n in sorted(have.keys() - want)]
    out += [
        f"{n}: recipe says '{have[n]}', pyproject.toml says '{want[n]}'"
        for n in sorted(want.keys() & have.keys())
        if have[n] != want[n]
    ]
    python = [line for line in recipe["requirements"]["run"] if line.split()[0] == "python"]
    expected = f"python >={requires_python_min()}"
    if [line.replace(" ", "") for line in python] != [expected.replace(" ", "")]:
        out.append(f"python: recipe says {python}, requires-python means '{expected}'")
    return out
