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
PACKAGES = {"shared": "axon_shared", "transformer": "transformer", "x_llama": "x_llama", "dali_ddpm": "dali_ddpm", "instructgpt_rlhf": "instructgpt_rlhf"}
DIST_OF_IMPORT = {"axon_shared": "axon-shared", "x_llama": "x-llama", "transformer": "transformer", "dali_ddpm": "dali-ddpm", "instructgpt_rlhf": "instructgpt-rlhf"}
ALLOWED_SIBLINGS = {"shared": set(), "transformer": {"axon_shared"}, "x_llama": {"axon_shared"}, "dali_ddpm": {"axon_shared"}, "instructgpt_rlhf": {"axon_shared", "x_llama"}}


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
    optional = {normalise(re.split(r"[<>=!~\[ ;@]", d, maxsplit=1)[0]) for ds in project.get("optional-dependencies", {}).values() for d in ds}
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
