"""dml_tf as a package: the wheel holds every module, imports from anywhere, starts lazily."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_modules():
    """Every dml_tf module of the checkout, as a path inside a wheel."""
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "dml_tf")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                     for f in files if f.endswith(".py"))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (no build artefacts in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "dml_tf"), src / "dml_tf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = out.glob("dml_tf-*.whl")
    return path


def test_wheel_holds_every_module_and_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = _source_modules()
    assert {"dml_tf/__init__.py", "dml_tf/mutual_learning.py", "dml_tf/methods/__init__.py",
            "dml_tf/nets/__init__.py", "dml_tf/data/__init__.py",
            "dml_tf/evaluation/__init__.py"} <= modules
    assert modules <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))]


def test_wheel_requires_the_pinned_dependencies(wheel):
    archive = zipfile.ZipFile(wheel)
    [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    requires = set(re.findall(r"^Requires-Dist: (\S+)$", archive.read(metadata).decode(), re.M))
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pins = tomllib.load(f)["project"]["dependencies"]
    assert {_normalised(r) for r in requires} == {_normalised(p) for p in pins}
    assert {"tensorflow==2.21.0", "keras==3.15.1"} <= requires
    assert all("==" in pin for pin in pins)


def _normalised(requirement):
    """PEP 503 name normalisation (wheel metadata writes importlib_resources as importlib-resources)."""
    name, _, version = requirement.partition("==")
    return re.sub(r"[-_.]+", "-", name).lower() + "==" + version


def test_every_pin_says_why():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        lines = f.read().split("dependencies = [", 1)[1].split("]", 1)[0].splitlines()
    core = {"tensorflow", "keras", "tensorflow-datasets", "numpy", "absl-py"}  # DESIGN's own
    for i, line in enumerate(lines):
        match = re.match(r'\s*"([\w-]+)==', line)
        if match and match.group(1) not in core:
            assert lines[i - 1].strip().startswith("#"), f"{match.group(1)} has no reason"


def test_requirements_install_the_project():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert lines == ["-e ."]
    with open(os.path.join(ROOT, "requirements-test.txt")) as f:
        assert "-r requirements.txt" in f.read().splitlines()


_IMPORT = """
import sys
import dml_tf
from dml_tf import config
assert dml_tf.__file__.startswith(sys.argv[1]), dml_tf.__file__
assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "eager import"
model_class = dml_tf.MutualLearning
assert "tensorflow" in sys.modules and model_class.__module__ == "dml_tf.mutual_learning"
import keras
assert issubclass(model_class, keras.Model)
print("ok")
"""


def test_the_wheels_dml_tf_imports_from_another_folder_without_tensorflow_until_asked(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the wheel's contents and the venv's own site-packages: not the checkout.
    env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", _IMPORT, str(site)], capture_output=True,
                          text=True, cwd=elsewhere, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_an_unknown_attribute_is_still_an_attribute_error():
    proc = subprocess.run([sys.executable, "-c", "import dml_tf; dml_tf.Nope"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "AttributeError: module 'dml_tf' has no attribute 'Nope'" in proc.stderr
