"""Deep Mutual Learning on CIFAR-10/100 (paper Table 2) and the offline digits quickstart.

  python run_cifar.py --flagfile=flags/quickstart.flags
  python run_cifar.py --flagfile=flags/cifar100/dml_resnet32_resnet32.flags --data_dir=/data/cifar-100-binary
"""

from absl import flags

from dml_tf import cli, config

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """The shared flags plus CIFAR's own (a function, so tests can parse into fresh FlagValues)."""
    config.define_flags(flag_values)
    flags.DEFINE_enum("dataset", "cifar100", ["cifar10", "cifar100", "digits", "npz"],
                      "cifar10 / cifar100 (paper Table 2), digits (scikit-learn's bundled 8x8 "
                      "digits upsampled to 32x32: offline, for the quickstart) or npz (uint8 "
                      "x_train/x_test and y_train/y_test arrays in the .npz file --data_dir).",
                      flag_values=flag_values)
    flags.DEFINE_string("data_dir", None,
                        "An extracted cifar-10-batches-bin or cifar-100-binary folder (the original "
                        "binary version, or its parent); unset: tensorflow-datasets (downloads). "
                        "With --dataset=npz: the .npz file.", flag_values=flag_values)
    flags.DEFINE_string("tfds_data_dir", None,
                        "tensorflow-datasets data_dir (default ~/tensorflow_datasets).",
                        flag_values=flag_values)
    flags.DEFINE_float("labelled_fraction", 1.0, "Semi-supervised (paper Fig. 6a): the seeded "
                       "share of each class that keeps its label.", flag_values=flag_values)


def make_config(flag_values):
    return config.config_from_flags(flag_values)


if __name__ == "__main__":
    cli.main(define_flags, make_config)
