"""End to end: a few steps on CIFAR-10 binary files written here, resume, export, reload."""

import dataclasses
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dml_tf import config as config_lib
from dml_tf import train_lib
from dml_tf.errors import UserError


def _write_cifar10(folder, rng):
    """The original layout: per record 1 label byte, then the R, G, B planes (32x32 each)."""
    folder.mkdir(parents=True)
    images = {}
    for name, n in [(f"data_batch_{i}.bin", 16) for i in range(1, 6)] + [("test_batch.bin", 24)]:
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        planes = x.transpose(0, 3, 1, 2).reshape(n, -1)
        (folder / name).write_bytes(np.concatenate([y[:, None], planes], axis=1).tobytes())
        images[name] = (x, y)
    return images


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "cifar-10-batches-bin"
    return folder, _write_cifar10(folder, np.random.default_rng(0))


def _config(model_dir, data_dir, **overrides):
    base = config_lib.Config(
        dataset="cifar10", data_dir=str(data_dir), nets=("tiny", "tiny"), method="dml",
        epochs=1, steps_per_epoch=2, batch_size=16, eval_batch_size=10, learning_rate=0.05,
        model_dir=str(model_dir), export=True)
    return dataclasses.replace(base, **overrides)


def _scalar_tags(model_dir):
    tags = set()
    for path in glob.glob(os.path.join(model_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def test_train_resume_export(cifar_dir, tmp_path, capsys):
    folder, arrays = cifar_dir
    model_dir = tmp_path / "run"
    results = train_lib.train_and_evaluate(_config(model_dir, folder))

    # results.json: flat, keyed like the TensorBoard tags, accuracies as fractions.
    on_disk = json.loads((model_dir / "results.json").read_text())
    assert on_disk == pytest.approx(results)
    for key in ("test/peer1/top1", "test/peer2/top1", "test/peer1/top5", "test/mean/top1",
                "test/ensemble/top1", "train/peer1/ce", "train/peer2/mimicry"):
        assert key in on_disk
    for key in ("test/peer1/top1", "test/ensemble/top5"):
        assert 0.0 <= on_disk[key] <= 1.0
    flags_json = json.loads((model_dir / "flags.json").read_text())
    assert flags_json["nets"] == ["tiny", "tiny"] and flags_json["method"] == "dml"
    tags = _scalar_tags(str(model_dir))
    assert {"train/peer1/ce", "train/peer1/mimicry", "train/peer2/ce", "test/peer1/top1",
            "test/ensemble/top1", "lr/peer1", "lr/peer2"} <= tags

    # Resume: the same command with more epochs continues from epoch 1, step 2.
    capsys.readouterr()
    train_lib.train_and_evaluate(_config(model_dir, folder, epochs=2))
    assert "Resumed" in capsys.readouterr().out
    cfg = _config(model_dir, folder, epochs=2)
    cohort = train_lib.build_cohort(cfg, 10, (32, 32, 3), steps_per_epoch=2)
    checkpoint = tf.train.Checkpoint(epoch=tf.Variable(0, dtype=tf.int64), peer1=cohort.models[0],
                                     peer2=cohort.models[1], optimizer1=cohort.optimizers[0],
                                     optimizer2=cohort.optimizers[1])
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    checkpoint.restore(latest).assert_existing_objects_matched()
    assert int(checkpoint.epoch.numpy()) == 2
    assert int(cohort.optimizers[0].iterations.numpy()) == 4  # 2 steps x 2 epochs, not 2 + 4

    # Export: uint8 in, the restored cohort's probabilities out (normalised with numpy stats).
    train_x = np.concatenate([arrays[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    mean = train_x.reshape(-1, 3).astype(np.float64).mean(axis=0)
    std = train_x.reshape(-1, 3).astype(np.float64).std(axis=0)
    test_x = arrays["test_batch.bin"][0][:5]
    inputs = ((test_x - mean) / std).astype(np.float32)
    expected = [m(inputs, training=False).numpy() for m in cohort.models]
    expected = [np.exp(z) / np.exp(z).sum(1, keepdims=True) for z in expected]
    for name, probs in [("peer1", expected[0]), ("peer2", expected[1]),
                        ("ensemble", (expected[0] + expected[1]) / 2)]:
        served = tf.saved_model.load(str(model_dir / "export" / name)).signatures["serving_default"](
            images=tf.constant(test_x))
        np.testing.assert_allclose(served["probabilities"].numpy(), probs, atol=1e-5)
        assert served["logits"].shape == (5, 10)
    # Features: the "features" layer per peer; the ensemble's is their normalised concatenation.
    feats = [keras.Model(m.input, m.get_layer("features").output)(inputs).numpy()
             for m in cohort.models]
    unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in feats]
    for name, expected_features in [("peer1", feats[0]), ("ensemble", np.concatenate(unit, 1))]:
        served = tf.saved_model.load(str(model_dir / "export" / name)).signatures["serving_default"](
            images=tf.constant(test_x))
        np.testing.assert_allclose(served["features"].numpy(), expected_features, atol=1e-4)


def test_model_dir_of_another_run_is_refused(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    model_dir = tmp_path / "run"
    train_lib.train_and_evaluate(_config(model_dir, folder, export=False))
    with pytest.raises(UserError, match="method"):
        train_lib.train_and_evaluate(_config(model_dir, folder, method="independent", export=False))


def test_sequential_three_peers_simultaneous(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    results = train_lib.train_and_evaluate(_config(
        tmp_path / "run", folder, nets=("tiny",) * 3, update="simultaneous", method="dml_e",
        export=False, optimizer="adam", lr_decay_rate=1.0))
    assert "test/peer3/top1" in results and "train/peer3/mimicry" in results


def test_missing_data_dir_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--data_dir"):
        train_lib.train_and_evaluate(_config(tmp_path / "run", tmp_path / "nowhere"))


def test_restore_cohort_reproduces_the_trained_predictions(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    cfg = _config(tmp_path / "run", folder, export=False, nets=("tiny", "tiny"))
    cohort, _ = train_lib.train_cohort(cfg)
    restored_cfg, restored, data = train_lib.restore_cohort(str(tmp_path / "run"))
    assert restored_cfg == cfg
    images = tf.constant(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), tf.float32)
    for a, b in zip(cohort.predict(images), restored.predict(images)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "subset.npz"
    np.savez(path, x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 4, 40).astype(np.uint8),
             x_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 4, 10).astype(np.uint8))
    results = train_lib.train_and_evaluate(_config(tmp_path / "run", path, dataset="npz",
                                                   export=False))
    assert "test/ensemble/top1" in results
    with pytest.raises(UserError, match="--data_dir"):
        train_lib.train_and_evaluate(_config(tmp_path / "run2", tmp_path / "missing.npz",
                                             dataset="npz", export=False))


def test_labelled_per_class_takes_a_seeded_share_of_every_class():
    from dml_tf.tasks import labelled_per_class
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    mask = labelled_per_class(labels, 0.1, seed=3)
    assert [int(mask[labels == c].sum()) for c in range(4)] == [1, 2, 3, 4]
    np.testing.assert_array_equal(mask, labelled_per_class(labels, 0.1, seed=3))
    assert not np.array_equal(mask, labelled_per_class(labels, 0.1, seed=4))
    assert labelled_per_class(labels, 1.0, seed=0).all()


def test_semi_supervised_tasks(cifar_dir):
    from dml_tf import tasks
    folder, _ = cifar_dir
    cfg = _config("unused", folder, labelled_fraction=0.25)
    task = tasks.make(cfg)
    only = task.semi_supervised("labelled_only", cfg)
    everything = task.semi_supervised("dml_all", cfg)
    labelled = everything.data.y_train >= 0
    assert everything.num_train == task.num_train == 80
    # Exactly the labelled examples keep their labels; labelled_only keeps just those.
    np.testing.assert_array_equal(everything.data.y_train[labelled], task.data.y_train[labelled])
    np.testing.assert_array_equal(only.data.x_train, task.data.x_train[labelled])
    assert only.num_train == labelled.sum()


def test_budget_in_steps_views_and_semi_supervised_run(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    cfg = _config(tmp_path / "run", folder, export=False, epochs=50, train_steps=3,
                  per_peer_augmentation=True, semi_supervised="dml_all", labelled_fraction=0.5)
    cohort, results = train_lib.train_cohort(cfg)
    assert int(cohort.optimizers[0].iterations.numpy()) == 3  # 2 + 1: the last epoch cut short
    assert cohort.trace_count == 1
    assert "test/peer2/top1" in results


def test_kd_teacher_is_restored_and_stays_fixed(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    teacher_dir = tmp_path / "teacher"
    teacher, _ = train_lib.train_cohort(_config(teacher_dir, folder, method="independent",
                                                export=False))
    teacher_weights = [v.numpy() for v in teacher.models[0].variables]
    cfg = _config(tmp_path / "kd", folder, method="kd", teacher_checkpoint=str(teacher_dir),
                  export=False, epochs=2)
    cohort, results = train_lib.train_cohort(cfg)
    for expected, variable in zip(teacher_weights, cohort.models[0].variables):
        np.testing.assert_array_equal(expected, variable.numpy())
    assert "train/peer2/mimicry" in results
    with pytest.raises(UserError, match="--teacher_checkpoint"):
        train_lib.train_cohort(_config(tmp_path / "kd2", folder, method="kd", export=False))
    with pytest.raises(UserError, match="--teacher_checkpoint"):
        train_lib.train_cohort(_config(tmp_path / "kd3", folder, method="kd", export=False,
                                       teacher_checkpoint=str(tmp_path / "nowhere")))


def test_kd_teacher_of_another_shape_is_refused(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    rng = np.random.default_rng(2)
    npz = tmp_path / "four_classes.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(40) % 4, x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(8) % 4)
    train_lib.train_cohort(_config(tmp_path / "teacher", npz, dataset="npz", method="independent",
                                   export=False))
    with pytest.raises(UserError, match="peer1"):
        train_lib.train_cohort(_config(tmp_path / "kd", folder, method="kd", export=False,
                                       teacher_checkpoint=str(tmp_path / "teacher")))


def test_kdcl_general_estimates_weights_every_epoch(cifar_dir, tmp_path):
    folder, _ = cifar_dir
    cohort, _ = train_lib.train_cohort(_config(tmp_path / "run", folder, method="kdcl_general",
                                               val_fraction=0.25, epochs=2, export=False))
    tags = _scalar_tags(str(tmp_path / "run"))
    assert {"kdcl/weight1", "kdcl/weight2"} <= tags
    weights = cohort.method.teacher_weights.numpy()
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)


def test_epoch_dataset_is_the_tasks_own_with_tf_data_autotuning_off():
    """The epoch's batches are exactly the task's pipeline's for that epoch's seed, with
    tf.data's autotuning model off (deleting each epoch's iterator with it on stalled for
    seconds: bench/RESULTS.md)."""
    import types

    from dml_tf import data as data_lib
    from dml_tf import tasks

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 40).astype(np.int64)
    task = tasks.ClassificationTask(data_lib.ImageData(
        x_train=images, y_train=labels, x_test=images[:8], y_test=labels[:8], num_classes=4,
        mean=(120.0, 120.0, 120.0), std=(60.0, 60.0, 60.0), name="tiny"))
    run = types.SimpleNamespace(
        config=config_lib.Config(seed=3, batch_size=16), task=task,
        cohort=types.SimpleNamespace(num_peers=2, distributed=False))
    epoch_dataset = train_lib._epoch_dataset(run, epoch=2)
    assert epoch_dataset.options().autotune.enabled is False
    own = task.train_dataset(16, seed=3 * 100003 + 2, views=1)
    assert own.options().autotune.enabled is not False  # tf.data's default: on
    got, expected = list(epoch_dataset), list(own)
    assert len(got) == len(expected) == 2
    for (x, y), (x0, y0) in zip(got, expected):
        np.testing.assert_array_equal(x.numpy(), x0.numpy())
        np.testing.assert_array_equal(y.numpy(), y0.numpy())
