"""Deep Mutual Learning for person re-identification on Market-1501 (paper Table 3, Fig. 3).

  python run_market.py --flagfile=flags/market1501/dml_mobilenet_scratch.flags --data_dir=/data/Market-1501-v15.09.15

Defaults follow the authors' released code: MobileNet pair at 224x224, Adam lr 2e-4
(β1 0.5, β2 0.999, ε 1e-8), batch 16, weight decay 4e-5, label smoothing 0.1, 200k steps.
"""

from absl import flags

from dml_tf import cli, config

FLAGS = flags.FLAGS
DEFAULTS = dict(nets="mobilenet,mobilenet", optimizer="adam", learning_rate=2e-4, adam_beta1=0.5,
                adam_beta2=0.999, epsilon=1e-8, batch_size=16, weight_decay=4e-5,
                method_args="label_smoothing=0.1", lr_decay_rate=1.0, lr_decay_epochs=0.0,
                train_steps=200000, eval_every_epochs=25, eval_batch_size=64,
                model_dir="runs/market1501/default", image_size="224,224")


def define_flags(flag_values=FLAGS):
    """The settings' flags with Market-1501 defaults (DEFAULTS), Market-1501's own included."""
    config.define_flags(flag_values, "run_market.py", DEFAULTS)


def make_config(flag_values):
    return config.config_from_flags(flag_values, dataset="market1501")


if __name__ == "__main__":
    cli.main(FLAGS, define_flags, make_config)
