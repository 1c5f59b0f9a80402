"""Speed and memory of the Market-1501 evaluation on a random Market-sized problem.

3,368 queries x 19,732 gallery images (the real split sizes), 750 test identities under 6
cameras, about 2,800 junk (-1) and 3,800 distractor (0) gallery images, and features drawn
around one centre per identity so that correct matches rank high, as with a trained
network. Times L2 normalisation plus distances, `evaluate` (threaded and on one thread),
and a per-query Python loop of the usual open-reid/torchreid form on a subset of queries
(extrapolated), which also checks that both give the same numbers on that subset.

  .venv/bin/python bench/reid_eval_speed.py [--dim=1024] [--workers=0] [--chunk_size=128]

Prints a markdown table: wall and CPU seconds per step (CPU above wall means threads
overlapped; wall well above CPU means the machine was busy with something else), and peak
memory, the process's maximum resident set size (resource.getrusage) after each step, which
therefore only grows.
"""

import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from dml_tf.evaluation import reid  # noqa: E402

flags.DEFINE_integer("queries", 3368, "Query images (Market-1501: 3,368).")
flags.DEFINE_integer("gallery", 19732, "Gallery images (Market-1501: 19,732).")
flags.DEFINE_integer("ids", 750, "Test identities.")
flags.DEFINE_integer("cameras", 6, "Cameras.")
flags.DEFINE_integer("junk", 2800, "Gallery images with identity -1.")
flags.DEFINE_integer("distractors", 3800, "Gallery images with identity 0.")
flags.DEFINE_integer("dim", 1024, "Feature size (MobileNet v1: 1024; ResNet-50: 2048).")
flags.DEFINE_float("noise", 3.0, "Feature noise around the identity centre (in centre norms).")
flags.DEFINE_integer("workers", 0, "Threads of evaluate (0: its default).")
flags.DEFINE_integer("chunk_size", 128, "Query rows per block in evaluate.")
flags.DEFINE_integer("loop_queries", 200, "Queries for the per-query loop reference.")
flags.DEFINE_integer("seed", 0, "Seed.")
FLAGS = flags.FLAGS


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_problem(rng):
    """Random Market-like ids, cameras and features (float32)."""
    n_real = FLAGS.gallery - FLAGS.junk - FLAGS.distractors
    g_pids = np.concatenate([rng.integers(1, FLAGS.ids + 1, n_real),
                             np.full(FLAGS.junk, -1), np.zeros(FLAGS.distractors, int)])
    g_camids = rng.integers(1, FLAGS.cameras + 1, FLAGS.gallery)
    q_pids = rng.integers(1, FLAGS.ids + 1, FLAGS.queries)
    q_camids = rng.integers(1, FLAGS.cameras + 1, FLAGS.queries)
    centres = rng.standard_normal((FLAGS.ids + 1, FLAGS.dim), dtype=np.float32)

    def features(pids):
        f = rng.standard_normal((len(pids), FLAGS.dim), dtype=np.float32) * FLAGS.noise
        real = pids > 0
        f[real] += centres[pids[real]]
        return f

    return features(q_pids), features(g_pids), q_pids, g_pids, q_camids, g_camids


def loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """The usual per-query loop (argsort one row, mask, cumulative sums)."""
    all_cmc, all_ap = [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        keep = (pids != -1) & ~((pids == q_pids[i]) & (cams == q_camids[i]))
        matches = (pids[keep] == q_pids[i]).astype(np.int64)
        if not matches.any():
            continue
        all_cmc.append(np.minimum(matches.cumsum(), 1)[:max_rank])
        precision = matches.cumsum() / np.arange(1, len(matches) + 1)
        all_ap.append((precision * matches).sum() / matches.sum())
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap))


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    rows = []

    def timed(name, fn):
        start, cpu = time.perf_counter(), cpu_seconds()
        out = fn()
        rows.append((name, time.perf_counter() - start, cpu_seconds() - cpu, peak_mb()))
        return out

    qf, gf, q_pids, g_pids, q_camids, g_camids = timed("make random features",
                                                       lambda: make_problem(rng))
    distmat = timed("l2_normalize + euclidean_distances",
                    lambda: reid.euclidean_distances(reid.l2_normalize(qf), reid.l2_normalize(gf)))
    workers = FLAGS.workers or None
    cmc, mean_ap = timed(f"evaluate (workers={workers or 'default'}, chunk={FLAGS.chunk_size})",
                         lambda: reid.evaluate(distmat, q_pids, g_pids, q_camids, g_camids,
                                               chunk_size=FLAGS.chunk_size, workers=workers))
    timed(f"evaluate (workers=1, chunk={FLAGS.chunk_size})",
          lambda: reid.evaluate(distmat, q_pids, g_pids, q_camids, g_camids,
                                chunk_size=FLAGS.chunk_size, workers=1))
    n = min(FLAGS.loop_queries, FLAGS.queries)
    sub = (distmat[:n], q_pids[:n], g_pids, q_camids[:n], g_camids)
    start, cpu = time.perf_counter(), cpu_seconds()
    ref_cmc, ref_ap = loop_reference(*sub, max_rank=50)
    scale = FLAGS.queries / n
    rows.append((f"per-query loop reference, {n} queries extrapolated to {FLAGS.queries}",
                 (time.perf_counter() - start) * scale, (cpu_seconds() - cpu) * scale,
                 peak_mb()))
    sub_cmc, sub_ap = reid.evaluate(*sub, max_rank=50)
    agree = np.allclose(sub_cmc[:len(ref_cmc)], ref_cmc) and np.isclose(sub_ap, ref_ap)

    print(f"\nMarket-sized evaluation: {FLAGS.queries} queries x {FLAGS.gallery} gallery, "
          f"{FLAGS.dim}-d features, {FLAGS.ids} ids, {FLAGS.cameras} cameras, "
          f"{FLAGS.junk} junk, {FLAGS.distractors} distractors, {os.cpu_count()} CPUs\n")
    print("| step | wall s | CPU s | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for name, seconds, cpu, mb in rows:
        print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {mb:.0f} |")
    print(f"\ndistmat: {distmat.nbytes / 2**20:.0f} MB float32; mAP {mean_ap:.4f}, "
          f"rank-1 {cmc[0]:.4f}, rank-5 {cmc[4]:.4f}, rank-10 {cmc[9]:.4f} (random features); "
          f"vectorised == loop on the first {n} queries: {agree}")


if __name__ == "__main__":
    app.run(main)
