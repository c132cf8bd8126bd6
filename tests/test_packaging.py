"""Each package declares every third-party distribution it imports, so `pip install -e shared -e <pkg>` in a fresh
venv is enough; paper packages depend only on axon_shared (and instructgpt_rlhf on x_llama)."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def discover() -> dict[str, tuple[str, str]]:
    """{project folder: (import name, distribution name)} for every folder holding a pyproject.toml."""
    found = {}
    for pyproject in sorted(ROOT.glob("*/pyproject.toml")):
        meta = tomllib.loads(pyproject.read_text())
        include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
        found[pyproject.parent.name] = (include[0].rstrip("*"), meta["project"]["name"])
    return found


PROJECTS = discover()
PACKAGES = {folder: name for folder, (name, _) in PROJECTS.items()}
DIST_OF_IMPORT = {name: dist for name, dist in PROJECTS.values()}
# paper packages build on axon_shared only; the exceptions are listed here (instructgpt_rlhf aligns x_llama models)
EXTRA_SIBLINGS = {"instructgpt_rlhf": {"x_llama"}}
ALLOWED_SIBLINGS = {
    folder: set() if name == "axon_shared" else {"axon_shared"} | EXTRA_SIBLINGS.get(folder, set()) for folder, name in PACKAGES.items()
}


def test_every_paper_package_has_the_same_shape():
    """A package is found by its pyproject.toml alone: the Makefile's demo runs `<package>.cli demo`, and
    axon_shared.report collects `runs/demo/<package>/REPORT.md`."""
    assert "shared" in PACKAGES and len(PACKAGES) >= 5
    for folder, name in PACKAGES.items():
        if folder == "shared":
            continue
        assert name == folder, f"{folder}: the import name must be the folder name"
        for module in ("cli.py", "demo.py", "config.py"):
            assert (ROOT / folder / name / module).is_file(), f"{folder}/{name}/{module} is missing"
        assert (ROOT / folder / "README.md").is_file()
        assert (ROOT / "tests" / folder).is_dir(), f"tests/{folder}/ is missing"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level_imports(package_dir: Path) -> dict[str, bool]:
    """Imported top-level modules -> True if imported at module level of some file (not inside a function)."""
    found: dict[str, bool] = {}
    for path in package_dir.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                found[top] = found.get(top, False) or id(node) in module_level
    return found


def declared(project_dir: Path) -> tuple[set[str], set[str]]:
    project = tomllib.loads((project_dir / "pyproject.toml").read_text())["project"]
    required = {normalise(re.split(r"[<>=!~\[ ;@]", d, maxsplit=1)[0]) for d in project.get("dependencies", [])}
    optional = {
        normalise(re.split(r"[<>=!~\[ ;@]", d, maxsplit=1)[0]) for ds in project.get("optional-dependencies", {}).values() for d in ds
    }
    return required, optional


@pytest.mark.parametrize("project", sorted(PACKAGES))
def test_imports_are_declared(project):
    project_dir = ROOT / project
    import_name = PACKAGES[project]
    required, optional = declared(project_dir)
    dists = packages_distributions()
    problems = []
    for module, at_module_level in sorted(top_level_imports(project_dir / import_name).items()):
        if module in sys.stdlib_module_names or module == import_name or module == "__future__":
            continue
        if module in DIST_OF_IMPORT:
            if module not in ALLOWED_SIBLINGS[project]:
                problems.append(f"{module}: packages may depend only on {sorted(ALLOWED_SIBLINGS[project]) or 'nothing in Axon'}")
            elif normalise(DIST_OF_IMPORT[module]) not in required:
                problems.append(f"{module}: add {DIST_OF_IMPORT[module]!r} to dependencies")
            continue
        candidates = {normalise(d) for d in dists.get(module, [module])}
        pool = required if at_module_level else required | optional
        if not candidates & pool:
            where = "dependencies" if at_module_level else "dependencies or an optional extra"
            problems.append(f"{module}: imported but none of {sorted(candidates)} is in {where}")
    assert not problems, f"{project}/pyproject.toml: " + "; ".join(problems)
