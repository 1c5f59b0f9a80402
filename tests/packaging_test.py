"""dml_tf as a library: ranges in the metadata, pins for reproducible runs, a complete wheel."""

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dml_tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _ranges():
    """Every requirement pyproject.toml declares: the dependencies and each extra's."""
    project = _pyproject()
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + sum(extras.values(), [])]


def _requirement_lines(name):
    """The requirement lines of a requirements file (no comments, no options)."""
    with open(os.path.join(ROOT, name)) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [line for line in lines if line]


def _pins(name):
    """{canonical name: version} of a requirements file's `==` lines."""
    pins = {}
    for line in _requirement_lines(name):
        if not line.startswith("-"):
            requirement = Requirement(line)
            [spec] = requirement.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built offline from a copy of the sources (no build artefacts in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "dml_tf"), src / "dml_tf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = out.glob("dml_tf-*.whl")
    return path


def _metadata(wheel):
    archive = zipfile.ZipFile(wheel)
    [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(archive.read(name).decode())


def _source_files():
    """Every file of the dml_tf package in the checkout, as a path inside a wheel."""
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "dml_tf")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                     for f in files if f.endswith((".py", ".typed")))
    return found


def test_wheel_holds_the_package_its_types_and_licence_and_nothing_else(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = _source_files()
    assert {"dml_tf/__init__.py", "dml_tf/py.typed", "dml_tf/mutual_learning.py",
            "dml_tf/methods/__init__.py", "dml_tf/nets/__init__.py", "dml_tf/data/__init__.py",
            "dml_tf/evaluation/__init__.py"} <= files
    assert files <= names
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert all(n.startswith(("dml_tf/", f"dml_tf-{dml_tf.__version__}.dist-info/")) for n in names)


def test_wheel_metadata_declares_the_ranges_and_extras_of_pyproject(wheel):
    metadata = _metadata(wheel)
    declared = {str(Requirement(r)) for r in metadata.get_all("Requires-Dist")}
    expected = {str(r) for r in map(Requirement, _pyproject()["dependencies"])}
    for extra, requirements in _pyproject()["optional-dependencies"].items():
        expected |= {f'{r}; extra == "{extra}"' for r in map(Requirement, requirements)}
    assert {_canonical(r) for r in declared} == {_canonical(r) for r in expected}
    unconditional = [Requirement(r) for r in metadata.get_all("Requires-Dist") if "extra" not in r]
    assert not [r for r in unconditional if r.name in ("matplotlib", "scikit-learn")]
    assert sorted(metadata.get_all("Provides-Extra")) == ["analysis", "quickstart"]
    assert metadata["Version"] == dml_tf.__version__
    assert metadata["License-Expression"] == "MIT"
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def _canonical(requirement):
    """A requirement string with its name in PEP 503 form and its marker quoted one way."""
    parsed = Requirement(requirement)
    marker = f"; {parsed.marker}" if parsed.marker else ""
    return f"{canonicalize_name(parsed.name)}{parsed.specifier}{marker}"


def test_the_library_declares_ranges_each_with_a_lower_bound():
    for requirement in _ranges():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "==" not in operators, str(requirement)


def test_the_lowest_constraints_are_exactly_the_ranges_minimums():
    lowest = _pins("requirements-lowest.txt")
    for requirement in _ranges():
        [minimum] = [s.version for s in requirement.specifier if s.operator == ">="]
        assert lowest.get(canonicalize_name(requirement.name)) == minimum, str(requirement)


def test_the_pins_fall_inside_the_ranges_and_pin_every_dependency():
    pins = _pins("requirements.txt") | _pins("requirements-test.txt")
    for requirement in _ranges():
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} has no pin"
        assert requirement.specifier.contains(version), f"{requirement.name}=={version}"


def test_requirements_install_the_project_with_the_extras_each_run_needs():
    assert _requirement_lines("requirements.txt")[-1] == "-e .[quickstart]"
    test_lines = _requirement_lines("requirements-test.txt")
    assert test_lines[0] == "-r requirements.txt"
    extras = ",".join(sorted(_pyproject()["optional-dependencies"]))
    assert f"-e .[{extras}]" in test_lines  # the suite tests every extra


def test_ci_runs_the_readmes_test_command_then_the_lowest_versions():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    [command] = re.findall(r"^python3 -m venv .*requirements-test\.txt.*$", readme, re.M)
    assert command in ci
    assert "-c requirements-lowest.txt" in ci


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


def test_the_digits_module_without_scikit_learn_names_the_extra():
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "try:\n    import dml_tf.data.digits\nexcept ImportError as e:\n    print(e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.stdout.strip() == ("dml_tf.data.digits needs the quickstart extra (scikit-learn is "
                                   'not installed): pip install "dml_tf[quickstart]"')
