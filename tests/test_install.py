"""A non-editable install works outside the checkout: the wheel carries every module and the
recipes, and pyproject.toml declares every third-party package the code imports."""
import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

PACKAGES = ("ccl_repr", "evals")
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"sklearn": "scikit-learn", "yaml": "pyyaml", "umap": "umap-learn", "PIL": "pillow"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build from a copy of the sources, so the checkout gets no build/ or egg-info folders."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in (*PACKAGES, "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = (tmp / "dist").glob("ccl_repr-*.whl")
    return path


def test_wheel_carries_every_module_and_recipe(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        recipes = {p.name: p.read_bytes() for p in (REPO / "recipes").glob("*.yaml")}
        assert recipes and {f"ccl_repr/recipes/{n}" for n in recipes} <= names
        assert all(z.read(f"ccl_repr/recipes/{n}") == data for n, data in recipes.items())
    modules = {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert modules - names == set(), "add the missing (sub)packages to [tool.setuptools] packages"


def _third_party_imports() -> set[str]:
    found = set()
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in PACKAGES}


def test_every_imported_package_is_declared():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    names = {d.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip().lower()
             for d in declared}
    missing = {m for m in _third_party_imports() if DISTRIBUTIONS.get(m, m).lower() not in names}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_installed_wheel_runs_from_another_folder(wheel, tmp_path):
    """Into a fresh venv (sharing this environment's torch etc.), run from a folder with no checkout."""
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = subprocess.run([str(venv / "bin" / "ccl-repr"), "recipes"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    listed = [line.split()[0] for line in listing.stdout.splitlines()]
    assert listed == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    code = ("import ccl_repr, ccl_repr.config as c; print(ccl_repr.__file__); print(c.RECIPES_DIR); "
            "print(len([c.make_config(r) for r in c.list_recipes()]))")
    out = subprocess.run([str(py), "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    module, recipes_dir, count = out.stdout.split("\n")[:3]
    assert module.startswith(str(venv)) and recipes_dir.startswith(str(venv)), out.stdout  # not the checkout
    assert int(count) == len(listed)
