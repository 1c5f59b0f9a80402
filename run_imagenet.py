"""Deep Mutual Learning on ImageNet (paper Sec. 4.4, Fig. 2a): MobileNet and InceptionV1 cohorts.

  python run_imagenet.py --flagfile=flags/imagenet/dml_mobilenet_mobilenet.flags --data_dir=/data/imagenet-tfrecords

Defaults follow the paper: 224x224, RMSProp (decay 0.9), lr 0.1 x0.16 every 20 epochs
(staircase), batch 64.
"""

from absl import flags

from dml_tf import cli, config

FLAGS = flags.FLAGS
# RMSProp momentum 0.9 and ε 1.0 are TF-slim's ImageNet defaults (train_image_classifier.py),
# which the authors' TensorFlow code builds on; the paper gives only the decay.
DEFAULTS = dict(nets="mobilenet,mobilenet", optimizer="rmsprop", rmsprop_decay=0.9, momentum=0.9,
                epsilon=1.0, learning_rate=0.1, lr_decay_rate=0.16, lr_decay_epochs=20.0,
                batch_size=64, epochs=100, weight_decay=4e-5, eval_every_epochs=1,
                eval_batch_size=100, model_dir="runs/imagenet/default", image_size="224")


def define_flags(flag_values=FLAGS):
    """The settings' flags with ImageNet defaults (DEFAULTS), ImageNet's own included."""
    config.define_flags(flag_values, "run_imagenet.py", DEFAULTS)


def make_config(flag_values):
    return config.config_from_flags(flag_values, dataset="imagenet")


if __name__ == "__main__":
    cli.main(FLAGS, define_flags, make_config)
