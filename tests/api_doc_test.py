"""docs/api.md follows the code: every public signature as the code has it; help/dir see the API."""

import inspect
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each public callable, as docs/api.md names it: "module:attribute" to import, and the name the
# page writes (methods of MutualLearning and Cohort without their module, as a user calls them).
PUBLIC = {
    "dml_tf.quiet": "dml_tf:quiet",
    "dml_tf.MutualLearning": "dml_tf:MutualLearning",
    "MutualLearning.compile": "dml_tf:MutualLearning.compile",
    "MutualLearning.fit": "dml_tf:MutualLearning.fit",
    "MutualLearning.evaluate": "dml_tf:MutualLearning.evaluate",
    "MutualLearning.peer_logits": "dml_tf:MutualLearning.peer_logits",
    "MutualLearning.held_out_probabilities": "dml_tf:MutualLearning.held_out_probabilities",
    "dml_tf.methods.get": "dml_tf.methods:get",
    "dml_tf.methods.hyperparameters": "dml_tf.methods:hyperparameters",
    "dml_tf.nets.build": "dml_tf.nets:build",
    "dml_tf.nets.options": "dml_tf.nets:options",
    "dml_tf.losses.cross_entropy": "dml_tf.losses:cross_entropy",
    "dml_tf.losses.kl_divergence": "dml_tf.losses:kl_divergence",
    "dml_tf.losses.entropy": "dml_tf.losses:entropy",
    "dml_tf.losses.l2_weight_penalty": "dml_tf.losses:l2_weight_penalty",
    "dml_tf.cohort.Cohort": "dml_tf.cohort:Cohort",
    "Cohort.train_step": "dml_tf.cohort:Cohort.train_step",
    "Cohort.predict": "dml_tf.cohort:Cohort.predict",
    "dml_tf.export.export_cohort": "dml_tf.export:export_cohort",
    "dml_tf.data.load": "dml_tf.data:load",
    "dml_tf.data.augment.reflect_pad_random_crop": "dml_tf.data.augment:reflect_pad_random_crop",
    "dml_tf.data.cifar.load_binary": "dml_tf.data.cifar:load_binary",
    "dml_tf.data.market1501.parse_filename": "dml_tf.data.market1501:parse_filename",
    "dml_tf.data.market1501.scan": "dml_tf.data.market1501:scan",
    "dml_tf.evaluation.reid.evaluate": "dml_tf.evaluation.reid:evaluate",
}


def _doc():
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        return f.read()


def _plain_signature(obj):
    """The signature as a caller reads it: names, kinds and defaults, without type hints."""
    signature = inspect.signature(obj)
    params = [p.replace(annotation=p.empty) for p in signature.parameters.values()
              if p.name != "self"]
    return str(signature.replace(parameters=params, return_annotation=signature.empty))


def _resolve(target):
    module, _, attribute = target.partition(":")
    obj = __import__(module, fromlist=["_"])
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_signature_is_documented_as_the_code_has_it(name):
    written = f"### `{name}{_plain_signature(_resolve(PUBLIC[name]))}`"
    assert written in _doc(), f"docs/api.md lacks (or has another signature than) {written}"


def test_every_documented_signature_is_a_public_name_this_test_checks():
    headings = re.findall(r"^### `([\w.]+)\(", _doc(), re.M)
    assert sorted(headings) == sorted(PUBLIC)


def test_every_method_and_network_name_is_listed():
    from dml_tf import methods, nets
    doc = _doc()
    for name in methods.NAMES + nets.NAMES:
        assert f"`{name}`" in doc, name


def test_dir_and_help_show_the_public_api_and_dir_imports_nothing():
    code = """
import sys, pydoc
import dml_tf
listed = dir(dml_tf)
assert "tensorflow" not in sys.modules, "dir imported TensorFlow"
assert {"MutualLearning", "quiet", "methods", "nets", "losses", "export", "cohort"} <= set(listed)
text = pydoc.render_doc(dml_tf, renderer=pydoc.plaintext)
assert "class MutualLearning(" in text and "quiet()" in text, text[:3000]
print("ok")
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
