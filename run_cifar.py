"""Deep Mutual Learning on CIFAR-10/100 (paper Table 2) and the offline digits quickstart.

  python run_cifar.py --flagfile=flags/quickstart.flags
  python run_cifar.py --flagfile=flags/cifar100/dml_resnet32_resnet32.flags --data_dir=/data/cifar-100-binary
"""

from absl import flags

from dml_tf import cli, config

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """The settings' flags with the table's defaults, CIFAR's own included (a function, so
    tests can parse into fresh FlagValues)."""
    config.define_flags(flag_values, "run_cifar.py")


def make_config(flag_values):
    return config.config_from_flags(flag_values)


if __name__ == "__main__":
    cli.main(FLAGS, define_flags, make_config)
