"""Distribution on the CPU split into two logical devices, each check in a fresh process.

Logical devices must be configured before TensorFlow initialises, which pytest's process has
already done; tests/distribute_check.py runs each case and prints JSON.
"""

import json
import os
import socket
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "tests", "distribute_check.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(*args, timeout=240):
    proc = subprocess.run([sys.executable, CHECK, *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mirrored_two_replicas_match_one_device_on_the_same_global_batch():
    gaps = _run("mirrored")
    for update in ("sequential", "simultaneous"):
        assert gaps[update]["replicas"] == 2
        assert gaps[update]["loss"] < 1e-5
        assert gaps[update]["weights"] < 1e-5


def test_per_device_placement_puts_each_peer_on_its_own_device(tmp_path):
    out = _run("per_device", str(tmp_path))
    assert out["update"] == "simultaneous"
    assert [d[0].split("device:")[-1] for d in out["devices"]] == ["CPU:0", "CPU:1"]
    assert all(len(d) == 1 for d in out["devices"])
    assert out["slot_devices"][1] == out["devices"][1]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ",".join(map(str, ports))


def test_two_local_workers_end_with_identical_weights(tmp_path):
    ports = _free_ports(2)
    procs = [subprocess.Popen([sys.executable, CHECK, "worker", str(i), ports, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                              cwd=ROOT) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            try:
                stdout, stderr = proc.communicate(timeout=240)  # bounded: a hung worker fails
            except subprocess.TimeoutExpired:
                # Say why: usually the other worker stopped, and this one waited for it.
                others = [p.communicate(timeout=5)[1][-2000:] for p in procs
                          if p is not proc and p.poll() is not None]
                raise AssertionError(f"worker timed out; the other's stderr: {others}") from None
            assert proc.returncode == 0, stderr[-3000:]
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
    assert outputs[0]["step"] == outputs[1]["step"] == 3
    assert outputs[0]["weights"] == outputs[1]["weights"]
    assert outputs[0]["sum"] == outputs[1]["sum"]
    # Only the chief wrote the run's files and exports; the other worker's checkpoint copies
    # went to a scratch folder it removed at the end.
    run = tmp_path / "run"
    assert (run / "results.json").exists() and (run / "checkpoints").exists()
    assert {p.name for p in (run / "export").iterdir()} == {
        "peer1", "peer2", "ensemble", "COMPLETE.json"}
    assert not list(run.glob("worker_scratch_*"))


def test_mirrored_loop_checkpoints_summarises_and_exports(tmp_path):
    out = _run("mirrored_run", str(tmp_path))
    assert out["replicas"] == 2 and out["step"] == 4
    run = tmp_path / "run"
    assert (run / "results.json").exists() and list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "checkpoint").exists()
    # The export was reloaded and checked against the cohort inside the run.
    assert {p.name for p in (run / "export").iterdir()} == {
        "peer1", "peer2", "ensemble", "COMPLETE.json"}
