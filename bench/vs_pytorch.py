"""dml_tf's cohort step against a plain PyTorch DML loop, same networks, batch and optimiser.

A cohort of 2 ResNet-32 peers (CIFAR-100 shapes, option-A shortcuts, 470,004 trainable
parameters each in both frameworks, checked), batch 64, simultaneous update, SGD with
Nesterov momentum 0.9, weight decay 5e-4, on tensors already in memory. Each measurement
runs in its own process (so that the two frameworks' thread pools never meet), the
frameworks alternate, and the median images/s of each is reported.

torch is a benchmark-only dependency (never in requirements.txt):

  .venv/bin/pip install -r bench/requirements.txt
  .venv/bin/python bench/vs_pytorch.py [--rounds=5] [--steps=30] [--precision=float32]
"""

import json
import sys
import time

import timing
from absl import app, flags

flags.DEFINE_integer("rounds", 5, "Alternating rounds (one process per framework each).")
flags.DEFINE_integer("steps", 30, "Timed steps per process, after the warm-up.")
flags.DEFINE_integer("warmup", 5, "Untimed steps first (tracing, allocator warm-up).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"],
                  "dml_tf's --precision; PyTorch then runs under CPU autocast to bfloat16.")
flags.DEFINE_enum("worker", None, ["tf", "torch"], "Internal: time one framework and print JSON.")
FLAGS = flags.FLAGS

NUM_CLASSES = 100
TRAINABLE_PARAMETERS = 470_004  # ResNet-32, 100 classes, option-A shortcuts (Table 1: 0.5M)


def time_tf():
    import numpy as np

    cohort = timing.make_cohort(2, "resnet32", "dml", "simultaneous", precision=FLAGS.precision)
    trainable = sum(int(np.prod(v.shape)) for v in cohort.models[0].trainable_variables)
    assert trainable == TRAINABLE_PARAMETERS, trainable
    seconds = timing.seconds_per_step(cohort, timing.in_memory_batches(FLAGS.batch_size),
                                      FLAGS.steps, warmup=FLAGS.warmup)
    return FLAGS.batch_size / seconds


def time_torch():
    import contextlib

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

    torch.manual_seed(0)
    peers = [ResNet32(NUM_CLASSES) for _ in range(2)]
    trainable = sum(p.numel() for p in peers[0].parameters())
    assert trainable == TRAINABLE_PARAMETERS, trainable
    optimizers = [torch.optim.SGD(p.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4) for p in peers]
    images = torch.randn(FLAGS.batch_size, 3, 32, 32)
    labels = torch.randint(0, NUM_CLASSES, (FLAGS.batch_size,))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if FLAGS.precision == "mixed_bfloat16"
                else contextlib.nullcontext())

    def step():
        # DML, simultaneous: both peers predict, each learns from CE + KL(p_other ‖ p_self)
        # with the other's probabilities as constants, then both optimisers step.
        with autocast:
            logits = [p(images) for p in peers]
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
    return FLAGS.batch_size * FLAGS.steps / (time.perf_counter() - start)


def main(argv):
    del argv
    if FLAGS.worker:
        images_per_s = time_tf() if FLAGS.worker == "tf" else time_torch()
        print(json.dumps({"images_per_s": images_per_s}))
        return
    args = [f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}",
            f"--batch_size={FLAGS.batch_size}", f"--precision={FLAGS.precision}"]
    rates = timing.alternate(
        lambda framework: timing.run_worker(__file__, [f"--worker={framework}", *args])[
            "images_per_s"], ["tf", "torch"], FLAGS.rounds,
        log=lambda i, last: print(f"round {i + 1}: dml_tf {last['tf']:.0f} img/s, PyTorch "
                                  f"{last['torch']:.0f} img/s", file=sys.stderr))
    import torch
    tf_rate, torch_rate = timing.median(rates["tf"]), timing.median(rates["torch"])
    print(f"\nDML, 2 ResNet-32 peers, batch {FLAGS.batch_size}, simultaneous, SGD Nesterov, "
          f"{FLAGS.precision}, {timing.machine()}, torch {torch.__version__}; median of "
          f"{FLAGS.rounds} alternating processes x {FLAGS.steps} steps")
    print("| framework | images/s (median) | all rounds |\n|---|---|---|")
    for name, key in (("dml_tf", "tf"), ("PyTorch (plain loop)", "torch")):
        rounds = ", ".join(f"{r:.0f}" for r in rates[key])
        print(f"| {name} | {timing.median(rates[key]):.0f} | {rounds} |")
    print(f"| **dml_tf / PyTorch** | **{tf_rate / torch_rate:.2f}x** | target >= 1.3x |")


if __name__ == "__main__":
    app.run(main)
