"""environment.yml (conda) and pyproject.toml must install the same packages."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0]
    return name.lower().replace("_", "-")


def _pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        names |= {_name(r) for r in extra if not r.startswith("asyncpatterns")}
    return names


def _conda_packages() -> set[str]:
    text = (ROOT / "environment.yml").read_text()
    dependencies = text.split("dependencies:", 1)[1]
    names = {_name(m) for m in re.findall(r"^  - ([A-Za-z0-9_.-]+)", dependencies, re.M)}
    names |= {
        _name(m) for m in re.findall(r"^      - ([A-Za-z][A-Za-z0-9_.-]*)", dependencies, re.M)
    }
    return names - {"python", "pip", "greenlet"}  # greenlet: sqlalchemy[asyncio]'s extra


def test_environment_yml_matches_pyproject() -> None:
    assert _conda_packages() == _pyproject_packages()
