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
                model_dir="runs/market1501/default")


def define_flags(flag_values=FLAGS):
    """The shared flags with Market-1501 defaults, plus Market's own."""
    config.define_flags(flag_values)
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "The extracted Market-1501-v15.09.15 folder (or its "
                        "parent) with bounding_box_train, query, bounding_box_test and gt_bbox.", **fv)
    flags.DEFINE_string("image_size", "224,224", "H,W the crops are resized to (released code: "
                        "224x224; 256,128 keeps Market's 2:1 aspect ratio).", **fv)
    flags.DEFINE_integer("labelled_ids", 0, "Semi-supervised (paper Fig. 6b): the first M of the "
                         "751 training identities are labelled; 0 = all.", **fv)
    flags.DEFINE_enum("multiquery_pooling", "mean", ["mean", "max"], "Multi-query: pooling of a "
                      "query identity's gt_bbox features under its camera.", **fv)
    flags.DEFINE_enum("init", "scratch", ["scratch", "imagenet"], "Start from scratch or from "
                      "Keras' ImageNet MobileNet weights (downloaded once; paper Table 3 'pre?').", **fv)
    flags.DEFINE_string("init_checkpoint", None, "A local Keras weights file (.h5) for the "
                        "backbone, instead of --init=imagenet on a machine without network.", **fv)
    for name, value in DEFAULTS.items():
        flag_values.set_default(name, value)


def make_config(flag_values):
    return config.config_from_flags(flag_values, dataset="market1501")


if __name__ == "__main__":
    cli.main(define_flags, make_config)
