"""dml_tf's cohort step against PyTorch at its best CPU recipe, in float32 and in bfloat16.

A cohort of 2 ResNet-32 peers (CIFAR-100 shapes, option-A shortcuts, 470,004 trainable
parameters each in both frameworks, checked), batch 64, simultaneous update, SGD with
Nesterov momentum 0.9, weight decay 5e-4, on tensors already in memory. PyTorch runs every
CPU recipe it offers: eager and `torch.compile`, NCHW and `channels_last`, float32 and
`torch.autocast("cpu", torch.bfloat16)`; dml_tf runs its defaults in `float32` and
`mixed_bfloat16`, and each again with one intra-op thread and two inter-op threads, so
that the two peers' ops run side by side on the 2 cores (the run scripts'
`--intra_op_threads=1 --inter_op_threads=2`). Each measurement is its own process (the
frameworks' thread pools never meet), recipes alternate within a round, and medians are
reported. The machine's matmul ceilings (the better of TensorFlow's and PyTorch's large
float32 and bfloat16 matmuls) are measured in the same run, and each recipe's arithmetic
rate is given as a share of them.

torch is a benchmark-only dependency (never in requirements.txt):

  .venv/bin/pip install -r bench/requirements.txt
  .venv/bin/python bench/vs_pytorch.py [--rounds=3] [--steps=30] [--only=dml_tf,eager]
"""

import json
import sys
import time

import timing
from absl import app, flags

flags.DEFINE_integer("rounds", 3, "Alternating rounds (one process per recipe each).")
flags.DEFINE_integer("steps", 30, "Timed steps per process, after the warm-up.")
flags.DEFINE_integer("warmup", 5, "Untimed steps first (tracing, torch.compile, allocators).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("only", None, "Time only the recipes whose names contain one of these "
                  "strings (e.g. dml_tf,eager); the ceilings are always measured.")
flags.DEFINE_list("tf_options", [], "Extra dml_tf cohort options for every dml_tf recipe, "
                  "name=value (e.g. jit_compile=true), to try a change against PyTorch.")
flags.DEFINE_string("worker", None, "Internal: the recipe to time in this process.")
FLAGS = flags.FLAGS

NUM_CLASSES = 100
TRAINABLE_PARAMETERS = 470_004  # ResNet-32, 100 classes, option-A shortcuts (Table 1: 0.5M)
PRECISIONS = ("float32", "bfloat16")
TF_PRECISION = {"float32": "float32", "bfloat16": "mixed_bfloat16"}  # dml_tf's name of each

# name -> (framework, precision, options). tf options: intra_op / inter_op threads (0:
# TensorFlow's choice; 1 / 2 runs the two peers' ops side by side, one core each, as the run
# scripts' --intra_op_threads=1 --inter_op_threads=2 do). torch options: channels_last, compile.
RECIPES = {}
for _precision in PRECISIONS:
    for _intra_op, _inter_op in ((0, 0), (1, 2)):
        _name = f"dml_tf, {TF_PRECISION[_precision]}"
        if _intra_op:
            _name += f", intra_op_threads={_intra_op} inter_op_threads={_inter_op}"
        RECIPES[_name] = ("tf", _precision, {"intra_op": _intra_op, "inter_op": _inter_op})
for _precision in PRECISIONS:
    for _compiled in (False, True):
        for _channels_last in (False, True):
            _name = (f"PyTorch {'torch.compile' if _compiled else 'eager'}, "
                     f"{'float32' if _precision == 'float32' else 'bf16 autocast'}, "
                     f"{'channels_last' if _channels_last else 'NCHW'}")
            RECIPES[_name] = ("torch", _precision,
                              {"channels_last": _channels_last, "compile": _compiled})
CEILINGS = ("ceiling tf", "ceiling torch")


def training_gflop_per_image(model):
    """Forward + backward GFLOP of one image through `model`, counted from its layers:
    2 FLOPs per multiply-add of every convolution and dense layer, the backward pass twice
    the forward (the gradients of the inputs and of the weights)."""
    import keras

    macs = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels_out = layer.output.shape
            kernel_h, kernel_w, channels_in, _ = layer.kernel.shape
            macs += height * width * channels_out * kernel_h * kernel_w * channels_in
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.kernel.shape[0] * layer.kernel.shape[1]
    return 3 * 2 * macs / 1e9


def time_tf(precision, intra_op, inter_op):
    import numpy as np

    timing.set_threads(intra_op, inter_op)
    options = timing.parse_options(FLAGS.tf_options)
    cohort = timing.make_cohort(2, "resnet32", "dml", "simultaneous",
                                precision=TF_PRECISION[precision], **options)
    trainable = sum(int(np.prod(v.shape)) for v in cohort.models[0].trainable_variables)
    assert trainable == TRAINABLE_PARAMETERS, trainable
    seconds = timing.seconds_per_step(cohort, timing.in_memory_batches(FLAGS.batch_size),
                                      FLAGS.steps, warmup=FLAGS.warmup)
    return {"images_per_s": FLAGS.batch_size / seconds}


def _torch_resnet32():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        """He et al.'s CIFAR basic block; option A: strided identity, zero-padded channels."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.pad:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(out + shortcut)

    class ResNet32(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            layers, cin = [], 16
            for cout, stride in ((16, 1), (32, 2), (64, 2)):
                for i in range(5):
                    layers.append(Block(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x):
            x = self.layers(F.relu(self.bn(self.conv(x))))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    return ResNet32(NUM_CLASSES)


def time_torch(precision, channels_last, compile):
    import contextlib

    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    peers = [_torch_resnet32().to(memory_format=memory_format) for _ in range(2)]
    assert sum(p.numel() for p in peers[0].parameters()) == TRAINABLE_PARAMETERS
    optimizers = [torch.optim.SGD(p.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4) for p in peers]
    forwards = [torch.compile(p) if compile else p for p in peers]
    images = torch.randn(FLAGS.batch_size, 3, 32, 32).to(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (FLAGS.batch_size,))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16"
                else contextlib.nullcontext())

    def step():
        # DML, simultaneous: both peers predict, each learns from CE + KL(p_other ‖ p_self)
        # with the other's probabilities as constants, then both optimisers step.
        with autocast:
            logits = [forward(images) for forward in forwards]
        logits = [z.float() for z in logits]
        loss = 0.0
        for k in range(2):
            target = F.softmax(logits[1 - k].detach(), dim=1)
            mimicry = F.kl_div(F.log_softmax(logits[k], dim=1), target, reduction="batchmean")
            loss = loss + F.cross_entropy(logits[k], labels) + mimicry
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        return loss

    for p in peers:
        p.train()
    for _ in range(FLAGS.warmup):
        step()
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        loss = step()
    float(loss)
    return {"images_per_s": FLAGS.batch_size * FLAGS.steps / (time.perf_counter() - start)}


def _best_rate(run_once, repeats=5):
    """The best of `repeats` timings of `run_once`, as a rate (calls per second)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        best = min(best, time.perf_counter() - start)
    return 1 / best


def ceiling_tf(n=2048, chain=8):
    """GFLOP/s of TensorFlow's n x n matmul in float32 and in bfloat16."""
    import tensorflow as tf

    rates = {}
    for precision, dtype in zip(PRECISIONS, (tf.float32, tf.bfloat16)):
        # A chain of dependent products (scaled to keep their norm), so that no graph
        # optimisation can merge or skip any of them.
        a = tf.cast(tf.random.normal((n, n)), dtype)
        b = tf.cast(tf.random.normal((n, n)) / n ** 0.5, dtype)

        @tf.function
        def chained(a=a, b=b):
            for _ in range(chain):
                a = tf.matmul(a, b)
            return tf.reduce_sum(tf.cast(a, tf.float32))

        float(chained())
        rates[precision] = _best_rate(lambda: float(chained())) * chain * 2 * n ** 3 / 1e9
    return rates


def ceiling_torch(n=2048, chain=8):
    """GFLOP/s of PyTorch's n x n matmul in float32 and in bfloat16."""
    import torch

    rates = {}
    for precision, dtype in zip(PRECISIONS, (torch.float32, torch.bfloat16)):
        a = torch.randn(n, n).to(dtype)
        b = (torch.randn(n, n) / n ** 0.5).to(dtype)

        def chained(a=a, b=b):
            for _ in range(chain):
                a = torch.mm(a, b)
            return float(a.float().sum())

        chained()
        rates[precision] = _best_rate(chained) * chain * 2 * n ** 3 / 1e9
    return rates


def measure(name):
    if name == "flops":
        cohort = timing.make_cohort(2, "resnet32", "dml", "simultaneous")
        return sum(training_gflop_per_image(m) for m in cohort.models)
    if name == "ceiling tf":
        return ceiling_tf()
    if name == "ceiling torch":
        return ceiling_torch()
    framework, precision, options = RECIPES[name]
    return (time_tf if framework == "tf" else time_torch)(precision, **options)


def print_tables(results, ceilings, gflop_per_image):
    import torch

    print(f"\nDML, 2 ResNet-32 peers, batch {FLAGS.batch_size}, simultaneous, SGD Nesterov; "
          f"{timing.machine()}, torch {torch.__version__}; medians of {FLAGS.rounds} "
          f"alternating processes x {FLAGS.steps} steps; {gflop_per_image:.3f} GFLOP per "
          f"image for the pair (forward + backward, counted from the layers)")
    print("\n| ceiling (2048² matmul) | TensorFlow GFLOP/s | PyTorch GFLOP/s |\n|---|---|---|")
    for precision in PRECISIONS:
        print(f"| {precision} | {ceilings['tf'][precision]:.0f} | "
              f"{ceilings['torch'][precision]:.0f} |")
    for precision in PRECISIONS:
        names = [n for n in results if RECIPES[n][1] == precision]
        if not names:
            continue
        ceiling = max(ceilings["tf"][precision], ceilings["torch"][precision])
        print(f"\n**{precision}** (ceiling {ceiling:.0f} GFLOP/s)\n")
        print("| recipe | images/s (median) | GFLOP/s | of ceiling | all rounds |\n"
              "|---|---|---|---|---|")
        medians = {n: timing.median(results[n]) for n in names}
        for name in names:
            rounds = ", ".join(f"{r:.0f}" for r in results[name])
            rate = medians[name] * gflop_per_image
            print(f"| {name} | {medians[name]:.0f} | {rate:.0f} | {rate / ceiling:.0%} | "
                  f"{rounds} |")
        ours = [n for n in names if RECIPES[n][0] == "tf"]
        theirs = [n for n in names if RECIPES[n][0] == "torch"]
        if ours and theirs:
            best_ours, best = max(ours, key=medians.get), max(theirs, key=medians.get)
            print(f"| **dml_tf's best ({best_ours}) / PyTorch's best ({best})** | "
                  f"**{medians[best_ours] / medians[best]:.2f}x** | | | target >= 1.5x |")


def main(argv):
    del argv
    if FLAGS.worker:
        print(json.dumps(measure(FLAGS.worker)))
        return
    names = [n for n in RECIPES if not FLAGS.only or any(s in n for s in FLAGS.only)]
    args = [f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
            f"--batch_size={FLAGS.batch_size}", *[f"--tf_options={o}" for o in FLAGS.tf_options]]
    outputs = timing.alternate(
        lambda name: timing.run_worker(__file__, [f"--worker={name}", *args]),
        [*CEILINGS, *names], FLAGS.rounds,
        log=lambda i, last: print(f"round {i + 1}: " + "; ".join(
            f"{n}: {v.get('images_per_s', v) if isinstance(v, dict) else v}"
            for n, v in last.items()), file=sys.stderr))
    ceilings = {name.split()[1]: {p: max(o[p] for o in outputs[name]) for p in PRECISIONS}
                for name in CEILINGS}
    results = {n: [o["images_per_s"] for o in outputs[n]] for n in names}
    print_tables(results, ceilings, timing.run_worker(__file__, ["--worker=flops"]))


if __name__ == "__main__":
    app.run(main)
