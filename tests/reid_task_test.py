"""Market-1501 end to end on a tiny dataset in the real layout: train, retrieval metrics, export."""

import dataclasses
import json
import re

import numpy as np
import pytest
import tensorflow as tf

from data_market1501_test import write_market  # the tiny Market layout of the loader tests
from dml_tf import config as config_lib
from dml_tf import reid_task, train_lib
from dml_tf.data import market1501
from dml_tf.errors import UserError


@pytest.fixture(scope="module")
def market_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("market") / market1501.DATASET_FOLDER)
    write_market(root)
    return root


def _config(model_dir, data_dir, **overrides):
    base = config_lib.Config(
        dataset="market1501", data_dir=data_dir, image_size=(32, 32), nets=("tiny", "tiny"),
        method="dml", method_args=(("label_smoothing", 0.1),), optimizer="adam",
        learning_rate=2e-4, adam_beta1=0.5, epsilon=1e-8, lr_decay_rate=1.0, batch_size=2,
        eval_batch_size=3, epochs=1, steps_per_epoch=2, weight_decay=4e-5,
        model_dir=str(model_dir))
    return dataclasses.replace(base, **overrides)


def test_market_run_reports_retrieval_metrics_and_exports_features(market_dir, tmp_path):
    cfg = _config(tmp_path / "run", market_dir)
    cohort, results = train_lib.train_cohort(cfg)
    assert cohort.models[0].output_shape[-1] == 3  # three training identities
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    for who in ("peer1", "peer2", "mean", "ensemble"):
        for name in ("mAP", "rank1", "rank5", "mq_mAP", "mq_rank1"):
            assert 0.0 <= on_disk[f"test/{who}/{name}"] <= 1.0
    assert on_disk["test/mean/mAP"] == pytest.approx(
        (on_disk["test/peer1/mAP"] + on_disk["test/peer2/mAP"]) / 2)
    # Any image size is served: the SavedModel resizes like the pipeline does.
    served = tf.saved_model.load(str(tmp_path / "run" / "export" / "ensemble"))
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 40, 20, 3)), tf.uint8)
    out = served.signatures["serving_default"](images=images)
    assert out["features"].shape == (2, 2 * cohort.models[0].get_layer("features").output.shape[-1])
    assert out["probabilities"].shape == (2, 3)


def test_peer_metrics_equal_the_protocol_on_the_peer_features(market_dir, tmp_path):
    from dml_tf.evaluation import reid
    cohort, results = train_lib.train_cohort(_config(tmp_path / "run", market_dir, export=False))
    splits = market1501.scan(market_dir)
    task = reid_task.ReidTask(splits, (32, 32))
    images = lambda split: np.stack([market1501.preprocess(market1501.decode(p), (32, 32)).numpy()
                                     for p in splits[split].paths])
    q = cohort.predict_features(tf.constant(images("query")))[1].numpy()
    g = cohort.predict_features(tf.constant(images("gallery")))[1].numpy()
    expected = reid.evaluate_features(q, g, splits["query"].pids, splits["gallery"].pids,
                                      splits["query"].camids, splits["gallery"].camids)
    assert results["test/peer2/mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert task.num_classes == 3


def test_semi_supervised_identities(market_dir):
    task = market_task = reid_task.market_task(_config("unused", market_dir))
    cfg = _config("unused", market_dir, labelled_ids=2)
    only = task.semi_supervised("labelled_only", cfg)
    everything = task.semi_supervised("dml_all", cfg)
    assert only.num_classes == 2 and set(only.labels) == {0, 1}
    assert everything.num_train == market_task.num_train
    assert (everything.labels == -1).sum() == market_task.num_train - only.num_train
    with pytest.raises(UserError, match="--labelled_ids"):
        task.semi_supervised("dml_all", _config("unused", market_dir))


def test_missing_data_dir_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--data_dir"):
        train_lib.train_and_evaluate(_config(tmp_path / "run", None))


def _checkpoints(run):
    return sorted(p.name for p in run.rglob("*") if p.name.startswith("ckpt"))


@pytest.mark.parametrize("folder", ["bounding_box_test", "query", "gt_bbox"])
def test_a_png_named_jpg_in_an_evaluation_split_stops_the_run_before_training(tmp_path, folder):
    root = tmp_path / market1501.DATASET_FOLDER
    write_market(str(root))
    victim = sorted((root / folder).glob("*.jpg"))[0]
    victim.write_bytes(tf.io.encode_png(np.zeros((16, 8, 3), np.uint8)).numpy())
    expected = f"^{re.escape(str(victim))} is a PNG image, not a JPEG; replace it"
    # Found where the task is made, before any training step (it used to surface at the
    # first evaluation, after an epoch, and that epoch's checkpoint was not written).
    with pytest.raises(UserError, match=expected):
        reid_task.market_task(_config(tmp_path / "unused", str(root)))
    run = tmp_path / "run"
    with pytest.raises(UserError, match=expected):
        train_lib.train_and_evaluate(_config(run, str(root), export=False))
    assert not _checkpoints(run)


def test_an_empty_training_image_stops_the_task_before_training(tmp_path):
    root = tmp_path / market1501.DATASET_FOLDER
    write_market(str(root))
    victim = sorted((root / "bounding_box_train").glob("*.jpg"))[1]
    victim.write_bytes(b"")
    with pytest.raises(UserError, match=rf"^{re.escape(str(victim))} is empty \(0 bytes\)"):
        reid_task.market_task(_config(tmp_path / "unused", str(root)))


def test_a_jpeg_damaged_inside_is_named_when_training_decodes_it(tmp_path):
    from data_market1501_test import damaged_inside
    root = tmp_path / market1501.DATASET_FOLDER
    write_market(str(root))
    images = sorted((root / "bounding_box_train").glob("*.jpg"))
    for image in images:  # every one, so that the first batch holds one whichever the order
        damaged_inside(str(image))  # complete markers: the cheap check passes it
    victim = images[0]  # the diagnosis names the first in name order
    reid_task.market_task(_config(tmp_path / "unused", str(root)))
    with pytest.raises(UserError, match=f"^{re.escape(str(victim))} cannot be read as a JPEG"):
        train_lib.train_and_evaluate(_config(tmp_path / "run", str(root), export=False))


def test_analysis_of_a_market_run(market_dir, tmp_path):
    import json as json_lib
    from dml_tf import analysis
    run = tmp_path / "run"
    train_lib.train_and_evaluate(_config(run, market_dir, export=False))
    _, _, data = train_lib.restore_cohort(str(run))
    # Training crops with their class labels; queries labelled by identity (t-SNE colours).
    assert data.x_train.shape == (7, 32, 32, 3) and set(data.y_train) <= {0, 1, 2}
    assert sorted(data.y_test) == [3, 5]
    analysis.analyze_runs([str(run)], sigmas=(0.0, 0.01), draws=1, noise_samples=0,
                          tsne_samples=0)
    result = json_lib.loads((run / "analysis.json").read_text())
    assert 0.0 <= result["peers"]["peer1"]["entropy"] <= np.log(3) + 1e-6
