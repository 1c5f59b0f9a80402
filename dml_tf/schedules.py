"""The paper's optimisers and learning-rate schedules (paper Sec. 4.1; METHODS.md)."""

import keras

from dml_tf.errors import UserError

from dml_tf.choices import OPTIMIZERS  # noqa: F401


def learning_rate(initial, *, decay_rate=1.0, decay_epochs=0.0, steps_per_epoch=1):
    """lr(step) = initial · decay_rate^⌊step / (decay_epochs · steps_per_epoch)⌋.

    One staircase form covers the paper's three settings: CIFAR ×0.1 every 60 epochs,
    ImageNet ×0.16 every 20 epochs, Market-1501 constant (decay_rate 1 or decay_epochs 0).
    """
    if initial <= 0:
        raise UserError(f"--learning_rate must be positive, got {initial}.")
    if decay_rate == 1.0 or not decay_epochs:
        return float(initial)
    if decay_rate <= 0 or decay_epochs < 0:
        raise UserError("--lr_decay_rate must be positive and --lr_decay_epochs non-negative, "
                        f"got {decay_rate} and {decay_epochs}.")
    return keras.optimizers.schedules.ExponentialDecay(
        initial, decay_steps=max(1, round(decay_epochs * steps_per_epoch)),
        decay_rate=decay_rate, staircase=True)


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
