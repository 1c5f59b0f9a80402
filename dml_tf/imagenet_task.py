"""ImageNet as a training task (paper Sec. 4.4): 1,000-way classification at 224x224.

Reads TFRecord shards (`--data_dir`) or tensorflow-datasets' imagenet2012 (the archives
downloaded by hand into its manual folder); see dml_tf.data.imagenet.
"""

import tensorflow as tf

from dml_tf import tasks
from dml_tf.data import imagenet
from dml_tf.errors import UserError
from dml_tf.evaluation import classification


class ImagenetTask:
    """Top-1/top-5 per peer, mean of peers and ensemble on the validation split."""

    headline_metrics = ("top1",)  # printed after each evaluation

    def __init__(self, source, image_size=imagenet.IMAGE_SIZE):
        """Args:
          source: an `imagenet.Source`; TFRecord shards are checked here, before training
            (`imagenet.check_shards`: both splits present, each shard a TFRecord file whose
            first record passes the pipelines' checks).
          image_size: side of the square network inputs, an int or an (S, S) pair.
        """
        if source.kind == "tfrecord":
            imagenet.check_shards(source)
        self.source = source
        self.image_size = imagenet.image_side(image_size)
        self.num_classes = imagenet.NUM_CLASSES
        self.input_shape = (self.image_size, self.image_size, 3)
        self.serving_shape = (None, None, 3)
        self.num_train = imagenet.num_examples(source, "train")

    def train_dataset(self, batch_size, seed, views=1):
        if views != 1:
            raise UserError("--per_peer_augmentation is implemented for the CIFAR pipeline only; "
                            "drop it for ImageNet.")
        return imagenet.train_dataset(self.source, batch_size, seed, self.image_size)

    def evaluate(self, cohort, batch_size):
        ds = imagenet.eval_dataset(self.source, batch_size, self.image_size)
        probs, labels = classification.collect_probabilities(cohort.predict,
                                                             tasks.diagnosed(self, ds))
        return classification.cohort_metrics(probs, labels, prefix="test")

    def preprocess(self, images):
        """uint8 images of any size -> resize, centre crop, [−1, 1] (the eval transform)."""
        return imagenet.preprocess_uint8(images, self.image_size)

    def export_sample(self, n=8):
        images, _ = next(iter(imagenet.eval_dataset(self.source, n, self.image_size)))
        return tf.cast(tf.round((images + 1.0) * 127.5), tf.uint8)

    def semi_supervised(self, mode, config):
        if mode != "none":
            raise UserError("--semi_supervised runs on CIFAR and Market-1501 (paper Sec. 4.10), "
                            "not on ImageNet.")
        return self

    def diagnose(self, error):
        """Turns a failed record check of the pipelines (a record's image missing, not a JPEG
        or truncated, or its label missing or out of range) into the one-sentence UserError
        naming the shard and record, and a shard's read error into one naming the folder
        (imagenet.record_error); returns for other errors."""
        user_error = imagenet.record_error(error, self.source)
        if user_error is not None:
            raise user_error from None

    def split_validation(self, fraction, seed):
        raise UserError("Methods that estimate on a held-out split (kdcl_general) need in-memory "
                        "data; on ImageNet pick another --method.")


def imagenet_task(config):
    source = imagenet.Source(data_dir=config.data_dir or None, tfds_data_dir=config.tfds_data_dir,
                             label_offset=config.label_offset)
    return ImagenetTask(source, config.image_size or imagenet.IMAGE_SIZE)
