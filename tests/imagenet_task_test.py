"""ImageNet end to end on TFRecord shards in the build_imagenet_data.py layout."""

import dataclasses
import re

import numpy as np
import pytest
import tensorflow as tf

from data_imagenet_test import write_shards  # tiny shards of real JPEGs
from dml_tf import config as config_lib
from dml_tf import train_lib
from dml_tf.errors import UserError


def _config(model_dir, data_dir, **overrides):
    base = config_lib.Config(
        dataset="imagenet", data_dir=str(data_dir), image_size=(32, 32), nets=("tiny", "tiny"),
        method="dml", optimizer="rmsprop", rmsprop_decay=0.9, momentum=0.9, epsilon=1.0,
        learning_rate=0.01, lr_decay_rate=0.16, lr_decay_epochs=20, batch_size=4,
        eval_batch_size=3, epochs=1, model_dir=str(model_dir))
    return dataclasses.replace(base, **overrides)


def test_imagenet_run_trains_evaluates_and_exports(tmp_path):
    shards = write_shards(tmp_path / "shards")
    cohort, results = train_lib.train_cohort(_config(tmp_path / "run", shards))
    assert cohort.models[0].output_shape[-1] == 1000
    assert int(cohort.optimizers[0].iterations.numpy()) == 2  # 8 training records / batch 4
    for key in ("test/peer1/top1", "test/peer1/top5", "test/mean/top1", "test/ensemble/top5"):
        assert 0.0 <= results[key] <= 1.0
    served = tf.saved_model.load(str(tmp_path / "run" / "export" / "ensemble"))
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 50, 70, 3)), tf.uint8)
    out = served.signatures["serving_default"](images=images)
    assert out["probabilities"].shape == (2, 1000)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-5)


def test_missing_shards_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--data_dir"):
        train_lib.train_and_evaluate(_config(tmp_path / "run", tmp_path / "nowhere"))


def test_a_png_record_is_named_when_the_run_reads_it(tmp_path):
    from data_imagenet_test import RECORD_FAULTS, faulty_shards
    record, _ = RECORD_FAULTS["png record"]
    shard = faulty_shards(tmp_path / "shards", record, "validation")
    with pytest.raises(UserError, match=rf"^{re.escape(shard)}, record 2 \(from 0\): its "
                                        rf"image/encoded is a PNG image, not a JPEG; rebuild "
                                        rf"that shard with build_imagenet_data.py"):
        train_lib.train_and_evaluate(_config(tmp_path / "run", tmp_path / "shards",
                                             export=False))


def test_a_garbage_shard_stops_the_run_before_training(tmp_path):
    shards = write_shards(tmp_path / "shards")
    garbage = shards / "train-00001-of-00002"
    garbage.write_bytes(b"PK\x03\x04 a zip file, not a TFRecord file" * 20)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=rf"^{re.escape(str(garbage))} is not a complete "
                                        rf"TFRecord file \(TensorFlow: corrupted record at 0"):
        train_lib.train_and_evaluate(_config(run, shards))
    assert not [p for p in run.rglob("*") if p.name.startswith("ckpt")]


def test_label_offset_flag_reaches_the_shards(tmp_path):
    """Shards of 0-based labels (label 0 present) train with --label_offset=0 and are refused,
    naming the offset, with the default 1."""
    from dml_tf import imagenet_task

    shards = write_shards(tmp_path / "shards", label_shift=1)  # build_imagenet_data.py's 1.. as 0..
    task = imagenet_task.imagenet_task(_config(tmp_path / "run", shards, label_offset=0))
    assert task.source.label_offset == 0
    with pytest.raises(UserError, match="minus label_offset=1"):
        train_lib.train_cohort(_config(tmp_path / "default", shards, export=False))
