"""The names a run can choose from, in a module that imports nothing heavy.

The run scripts define and check their flags from these tuples before TensorFlow is
imported (a mistake is reported in a second, not after TensorFlow's start-up); the modules
that implement each choice import the same tuples from here.
"""

UPDATES = ("sequential", "simultaneous")  # dml_tf.cohort
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")  # dml_tf.distribute
PLACEMENTS = ("replicated", "per_device")  # dml_tf.distribute
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")  # dml_tf.precision
OPTIMIZERS = ("sgd", "adam", "rmsprop")  # dml_tf.schedules
SEMI_SUPERVISED = ("none", "labelled_only", "dml_all")  # dml_tf.config
ON_NAN = ("stop", "skip")  # dml_tf.train_lib
CIFAR_DATASETS = ("cifar10", "cifar100", "digits", "npz")  # run_cifar.py's --dataset (dml_tf.tasks)
INITS = ("scratch", "imagenet")  # dml_tf.nets (Keras' ImageNet weights)
MULTIQUERY_POOLINGS = ("mean", "max")  # dml_tf.reid_task
# Methods whose frozen peer 1 is a trained teacher read from --teacher_checkpoint: the methods
# declaring `needs_teacher` (dml_tf.methods.base.Method), named here so that the run scripts
# check the teacher run before TensorFlow starts (tests/settings_test.py ties the two).
TEACHER_METHODS = ("kd",)
