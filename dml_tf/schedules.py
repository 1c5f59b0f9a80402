"""The paper's optimisers and learning-rate schedules (paper Sec. 4.1; docs/methods.md)."""

import keras

from dml_tf.errors import UserError

from dml_tf.choices import OPTIMIZERS  # noqa: F401


def learning_rate(initial, *, decay_rate=1.0, decay_epochs=0.0, steps_per_epoch=1,
                  warmup_epochs=0.0):
    """lr(step) = initial · decay_rate^⌊step / (decay_epochs · steps_per_epoch)⌋ · warm-up.

    One staircase form covers the paper's three settings: CIFAR ×0.1 every 60 epochs,
    ImageNet ×0.16 every 20 epochs, Market-1501 constant (decay_rate 1 or decay_epochs 0).
    `warmup_epochs` > 0 (a deviation from the paper, off in its flagfiles) multiplies it by
    min(1, (step + 1) / warmup_steps): see LinearWarmup.
    """
    if initial <= 0:
        raise UserError(f"--learning_rate must be positive, got {initial}.")
    if warmup_epochs < 0:
        raise UserError(f"--warmup_epochs must be 0 (off) or positive, got {warmup_epochs}.")
    lr = float(initial)
    if decay_rate != 1.0 and decay_epochs:
        if decay_rate <= 0 or decay_epochs < 0:
            raise UserError("--lr_decay_rate must be positive and --lr_decay_epochs non-negative, "
                            f"got {decay_rate} and {decay_epochs}.")
        lr = keras.optimizers.schedules.ExponentialDecay(
            initial, decay_steps=max(1, round(decay_epochs * steps_per_epoch)),
            decay_rate=decay_rate, staircase=True)
    if warmup_epochs:
        lr = LinearWarmup(lr, warmup_steps=max(1, round(warmup_epochs * steps_per_epoch)))
    return lr


@keras.saving.register_keras_serializable(package="dml_tf")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = after(step) · min(1, (step + 1) / warmup_steps): a linear ramp to `after`.

    The gradual warm-up of Goyal et al. 2017 ("Accurate, Large Minibatch SGD", Sec. 2.2),
    composed with any schedule by multiplication, so the staircase decays keep their steps.
    He et al. 2016 (Sec. 4.2) start ResNet-110 at lr 0.01 for the same reason: at the full
    rate the first CIFAR steps can blow up (and a DML cohort can then collapse to uniform
    predictions).
    """

    def __init__(self, after, warmup_steps):
        self.after = after
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        after = self.after(step) if callable(self.after) else self.after
        ramp = keras.ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return keras.ops.cast(after, "float32") * ramp

    def get_config(self):
        after = self.after
        if isinstance(after, keras.optimizers.schedules.LearningRateSchedule):
            after = keras.saving.serialize_keras_object(after)
        return {"after": after, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        after = config["after"]
        if isinstance(after, dict):
            after = keras.saving.deserialize_keras_object(after)
        return cls(after, config["warmup_steps"])


def optimizer(name, lr, *, momentum=0.9, nesterov=True, beta_1=0.9, beta_2=0.999,
              epsilon=1e-7, rho=0.9):
    """A fresh Keras optimizer (one per peer: each keeps its own slots).

    Args:
      name: "sgd" (CIFAR: Nesterov momentum 0.9), "adam" (Market-1501: β1 0.5, β2 0.999,
        ε 1e-8) or "rmsprop" (ImageNet: decay ρ 0.9).
      lr: a float or a keras LearningRateSchedule.
      momentum: SGD and RMSProp momentum.
      nesterov: SGD only.
      beta_1, beta_2: Adam only.
      epsilon: Adam and RMSProp.
      rho: RMSProp decay.
    """
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return keras.optimizers.Adam(lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr, rho=rho, momentum=momentum, epsilon=epsilon)
    raise UserError(f"--optimizer={name} is not an optimizer; choose one of {', '.join(OPTIMIZERS)}.")
