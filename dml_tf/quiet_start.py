"""TensorFlow's start-up without its C++ chatter; imports nothing heavy until `quiet()` runs.

What TensorFlow 2.21 prints on a machine without a GPU when it is imported and first used,
and what removes each line (measured on this project's CPU machines):

* ``WARNING: All log messages before absl::InitializeLog() ...`` and ``I0000 ...
  cudart_stub.cc:31] Could not find cuda drivers`` (twice: libtensorflow_framework and the
  profiler plugin each carry their own absl). They are written while the shared libraries
  load, before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, and no environment variable reaches
  that absl (it has no flags compiled in), so `quiet()` filters them out of file
  descriptor 2 during the import, applying the level the user would have wanted.
* ``I ... cpu_feature_guard.cc] This TensorFlow binary is optimized ...``: an INFO line that
  TF_CPP_MIN_LOG_LEVEL=1 removes.
* ``I ... oneDNN custom operations are on ...``: an INFO line, printed where oneDNN is on;
  `configure_environment` turns oneDNN on where TensorFlow would leave it off
  (``TF_ENABLE_ONEDNN_OPTS=1`` unless the user set it), for speed, not for quiet.
* ``E ... cuda_platform.cc:52] failed call to cuInit: ... UNKNOWN ERROR (303)``: an error
  about the missing GPU driver at the first op. CUDA_VISIBLE_DEVICES does not avoid the call
  (empty or -1, cuInit still runs); TF_ENABLED_DEVICE_TYPES=CPU does. It is set where no
  accelerator exists, and where the user hid the GPUs (CUDA_VISIBLE_DEVICES or
  HIP_VISIBLE_DEVICES empty or -1, each GPU platform either hidden so or without a device)
  on a machine without a TPU: CPU-only is then what they asked for.
"""

import contextlib
import glob
import os
import re
import sys
import threading

# What TF_CPP_MIN_LOG_LEVEL becomes unless the user set it: 1 drops INFO, keeps warnings and
# errors.
DEFAULT_MIN_LOG_LEVEL = "1"
# Each GPU platform TensorFlow could use: the variable that picks its devices, their nodes.
_GPU_PLATFORMS = (("CUDA_VISIBLE_DEVICES", ("/dev/nvidia[0-9]*",)),
                  ("HIP_VISIBLE_DEVICES", ("/dev/kfd",)))
_TPU_DEVICES = ("/dev/accel[0-9]*",)
# Values of a *_VISIBLE_DEVICES variable that hide every GPU of its platform.
_NO_GPU = ("", "-1")
# An absl-formatted line: severity letter, MMDD, time (absl prints 00:00:<epoch seconds> before
# InitializeLog), thread id, file:line].
_LOG_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] ")
_SEVERITIES = b"IWEF"  # index = TF_CPP_MIN_LOG_LEVEL that still shows the severity
_ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called"


def configure_environment(environ=os.environ):
    """Sets the environment TensorFlow reads at its import; a value the user set is kept."""
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_MIN_LOG_LEVEL)
    # TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI/BF16 or
    # AMX; elsewhere (AVX2: AMD Zen 3, older Intel) it runs Eigen's, and a cohort step took
    # 1.9-2.3x as long (measured on an AVX2 AMD EPYC, 2026-12-07).
    environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if "TF_ENABLED_DEVICE_TYPES" in environ:
        return
    if not any(variable in environ for variable, _ in _GPU_PLATFORMS):
        cpu_only = not has_accelerator()
    else:
        cpu_only = gpus_hidden(environ) and not _exists(_TPU_DEVICES)
    if cpu_only:
        # Without a device TensorFlow could (or may) use, skipping its GPU platform only skips
        # cuInit's error about the missing or hidden driver.
        environ["TF_ENABLED_DEVICE_TYPES"] = "CPU"


def gpus_hidden(environ=os.environ):
    """Whether every GPU platform is hidden by its variable (empty or -1) or has no device."""
    return all(environ[variable].strip() in _NO_GPU if variable in environ else not _exists(nodes)
               for variable, nodes in _GPU_PLATFORMS)


def has_accelerator():
    """Whether this machine has a GPU or TPU device node."""
    return _exists(_TPU_DEVICES + tuple(n for _, nodes in _GPU_PLATFORMS for n in nodes))


def _exists(patterns):
    return any(glob.glob(pattern) for pattern in patterns)


def quiet():
    """Imports TensorFlow without its start-up lines; call it before anything imports TensorFlow.

    Lines below TF_CPP_MIN_LOG_LEVEL (1 unless the user set another) that the libraries write
    while loading are dropped; everything else (warnings, errors, Python's own output) reaches
    stderr unchanged. Harmless when TensorFlow is already imported (then it only sets the
    environment, which TensorFlow no longer reads).
    """
    configure_environment()
    if "tensorflow" in sys.modules:
        return
    with filtered_stderr(min_log_level()):
        import tensorflow  # noqa: F401 (the import is the point)


def min_log_level(environ=os.environ):
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0 for a value that is not a level)."""
    try:
        return int(environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def keep_line(line, min_log_level):
    """Whether a line (bytes) written to stderr during the import is shown at `min_log_level`."""
    if min_log_level <= 0:
        return True
    if line.startswith(_ABSL_BANNER):  # absl's note about its own start-up, not TensorFlow's
        return False
    match = _LOG_LINE.match(line)
    return not match or _SEVERITIES.index(match.group(1)) >= min_log_level


@contextlib.contextmanager
def filtered_stderr(min_log_level):
    """Routes file descriptor 2 through `keep_line` for the duration of the block.

    A pipe replaces fd 2 (C++ libraries write there directly, past sys.stderr); a thread
    forwards the kept lines to the original stderr as they arrive, so nothing waits for the
    block to end and a crash inside it still shows its message.
    """
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if keep_line(line, min_log_level):
                    os.write(original, line)

    forwarder = threading.Thread(target=forward, name="quiet_start", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the forwarder reads to EOF
        # A child process started in the block would hold the pipe open: let the forwarder
        # serve it (and keep its copy of stderr) rather than wait for it.
        forwarder.join(timeout=10)
        if not forwarder.is_alive():
            os.close(original)
