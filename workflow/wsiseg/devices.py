"""Assignment of one GPU to each concurrent inference process.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once. It assigns no
device to a job, so without help every job would start on GPU 0. This module picks
the device and sets ``CUDA_VISIBLE_DEVICES`` to it. TensorFlow, JAX and PyTorch read that
variable when they first initialise CUDA, so ``assign_device`` must run before any of them
is imported.

The rules, in order:

1. ``CUDA_VISIBLE_DEVICES`` already set to one device (SLURM and other schedulers set it
   per job): use that device and take no lock. Set to an empty string or ``-1``: run on
   the CPU.
2. Otherwise the candidates are the ids that ``CUDA_VISIBLE_DEVICES`` lists when it names
   several (narrowed to the configured ids, if any), else the configured ids, else every
   GPU that ``nvidia-smi`` lists. No candidate at all: run on the CPU and log it.
3. Claim the first free candidate through an exclusive ``fcntl.flock`` on its lock file
   ``<lock_dir>/<host>-gpu-<id>.lock``. The lock is held through an open file descriptor
   for the rest of the process's life; the kernel releases it when the process exits or
   dies, ``kill -9`` included, so a crashed job never leaves a device claimed. When every
   candidate is held, wait until one is released.

The host name in the lock file name keeps GPUs of different hosts apart when the lock
directory sits on a shared file system.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsiseg.errors import ConfigError, WsisegError

logger = logging.getLogger(__name__)

CPU = "cpu"

# Origins of a device choice (DeviceAssignment.source).
SOURCE_SCHEDULER = "CUDA_VISIBLE_DEVICES"
SOURCE_LOCK = "lock"
SOURCE_NONE = "no_gpu"

_POLL_INTERVAL_S = 0.2
_WAIT_LOG_INTERVAL_S = 60.0
_NVIDIA_SMI_TIMEOUT_S = 20.0

# Modules that read CUDA_VISIBLE_DEVICES when they initialise CUDA.
_GPU_FRAMEWORKS = ("tensorflow", "jax", "torch")

# A device id becomes part of a file name, so only these characters are accepted.
_DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")

# File descriptors of held locks. A flock lasts until its descriptor is closed, so the
# descriptors stay here until release() or the end of the process.
_held_lock_fds: dict[Path, int] = {}

# The device this process claimed through a lock. After a claim, CUDA_VISIBLE_DEVICES
# names one device, so a second call would otherwise read it as a scheduler's choice.
_claimed: DeviceAssignment | None = None


@dataclass
class DeviceAssignment:
    """The device one process computes on and how it was chosen."""

    device_id: str | None  # the CUDA_VISIBLE_DEVICES value set, or None for the CPU
    source: str  # SOURCE_SCHEDULER, SOURCE_LOCK or SOURCE_NONE
    lock_path: Path | None = None
    waited_s: float = 0.0
    candidates: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Return ``gpu:<id>`` or ``cpu``, the form stored in output attributes."""
        return CPU if self.device_id is None else f"gpu:{self.device_id}"

    def release(self) -> None:
        """Release the device lock early (it is otherwise held until the process exits).

        CUDA_VISIBLE_DEVICES keeps the released device, because a framework that has
        started uses it anyway.
        """
        global _claimed
        if self.lock_path is None:
            return
        fd = _held_lock_fds.pop(self.lock_path, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self.lock_path = None
        if _claimed is self:
            _claimed = None


def default_lock_dir() -> Path:
    """Return the per-user lock directory used when none is configured."""
    return Path(tempfile.gettempdir()) / f"wsiseg-gpu-locks-{os.getuid()}"


def list_visible_gpus() -> list[str]:
    """Return the indices of the NVIDIA GPUs that ``nvidia-smi`` lists, or [] without one.

    ``nvidia-smi`` is asked rather than a framework, because importing one here would
    initialise CUDA before CUDA_VISIBLE_DEVICES is set.
    """
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []

    try:
        completed = subprocess.run(
            [executable, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("nvidia-smi failed (%s); assuming no GPU", error)
        return []
    if completed.returncode != 0:
        logger.warning(
            "nvidia-smi exited with status %d (%s); assuming no GPU",
            completed.returncode,
            completed.stderr.strip(),
        )
        return []

    return [line.strip() for line in completed.stdout.splitlines() if line.strip()]


def _split_device_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _check_device_ids(device_ids: Sequence[str]) -> list[str]:
    checked = []
    for device_id in device_ids:
        text = str(device_id).strip()
        if not _DEVICE_ID_PATTERN.match(text):
            raise ConfigError(
                f"invalid device id {device_id!r}: use a GPU index such as 0 or a UUID "
                "such as GPU-5f2e..."
            )
        if text not in checked:
            checked.append(text)
    return checked


def _warn_if_framework_imported() -> None:
    imported = [name for name in _GPU_FRAMEWORKS if name in sys.modules]
    if imported:
        logger.warning(
            "%s was imported before the GPU was assigned; if it has already initialised "
            "CUDA, it ignores the CUDA_VISIBLE_DEVICES set now",
            ", ".join(imported),
        )


def _lock_path(lock_dir: Path, device_id: str) -> Path:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    return lock_dir / f"{host}-gpu-{device_id}.lock"


def _try_lock(path: Path) -> int | None:
    """Return an open descriptor holding an exclusive flock on ``path``, or None if busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise

    # Record the holder for people inspecting the lock directory. The lock itself is the
    # flock, not this text, so a stale text after a crash does no harm.
    holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.time():.3f}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode("utf-8"), 0)
    return fd


def _claim(
    candidates: list[str], lock_dir: Path, wait_timeout_s: float | None
) -> tuple[str, Path, float]:
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the GPU lock directory {lock_dir}: {error}") from error

    started = time.monotonic()
    next_log = started + _WAIT_LOG_INTERVAL_S
    while True:
        for device_id in candidates:
            path = _lock_path(lock_dir, device_id)
            fd = _try_lock(path)
            if fd is not None:
                _held_lock_fds[path] = fd
                return device_id, path, time.monotonic() - started

        now = time.monotonic()
        if wait_timeout_s is not None and now - started >= wait_timeout_s:
            raise WsisegError(
                f"timed out after {wait_timeout_s:.0f} s waiting for a free GPU among "
                f"{candidates} (locks in {lock_dir}); allow fewer concurrent GPU jobs "
                "(--resources gpu=N) or list more devices"
            )
        if now >= next_log:
            logger.info(
                "still waiting for a free GPU among %s after %.0f s (locks in %s)",
                candidates,
                now - started,
                lock_dir,
            )
            next_log = now + _WAIT_LOG_INTERVAL_S
        time.sleep(_POLL_INTERVAL_S)


def assign_device(
    devices: Sequence[str | int] | None = None,
    lock_dir: str | os.PathLike | None = None,
    *,
    wait_timeout_s: float | None = None,
) -> DeviceAssignment:
    """Choose this process's GPU, set CUDA_VISIBLE_DEVICES to it and return the choice.

    ``devices`` lists the candidate device ids (None: every visible GPU; an empty list:
    the CPU, with every GPU hidden). ``lock_dir`` contains one lock file per device (None:
    ``default_lock_dir()``). ``wait_timeout_s`` bounds the wait for a free device (None:
    wait as long as it takes, logging every minute). Call this before TensorFlow, JAX or
    PyTorch is imported. A second call in a process that has claimed a device returns the
    same assignment.
    """
    global _claimed
    if _claimed is not None:
        return _claimed

    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    configured = None if devices is None else _check_device_ids([str(d) for d in devices])

    # An empty device list selects the CPU.
    if configured == []:
        logger.info("no devices configured; running on the CPU")
        _warn_if_framework_imported()
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return DeviceAssignment(device_id=None, source=SOURCE_NONE)

    # A scheduler (or the user) chose: one device means it is this job's own, and an
    # empty value or -1 hides every GPU.
    if inherited is not None:
        inherited_ids = _split_device_list(inherited)
        if not inherited_ids or inherited_ids[0] == "-1":
            logger.info("CUDA_VISIBLE_DEVICES=%r hides every GPU; running on the CPU", inherited)
            return DeviceAssignment(device_id=None, source=SOURCE_NONE)
        if len(inherited_ids) == 1:
            if configured is not None:
                logger.info(
                    "CUDA_VISIBLE_DEVICES=%s is set, so the configured devices %s are not used",
                    inherited_ids[0],
                    configured,
                )
            logger.info("using GPU %s assigned through CUDA_VISIBLE_DEVICES", inherited_ids[0])
            return DeviceAssignment(
                device_id=inherited_ids[0], source=SOURCE_SCHEDULER, candidates=inherited_ids
            )

    # Several devices are open to this process: claim one of them through a lock. Under
    # an inherited list, configured ids only narrow it, so no job leaves the devices that
    # the environment allows.
    if inherited is not None:
        candidates = _check_device_ids(_split_device_list(inherited))
        if configured is not None:
            candidates = [device_id for device_id in candidates if device_id in configured]
            if not candidates:
                raise ConfigError(
                    f"none of the configured devices {configured} is in "
                    f"CUDA_VISIBLE_DEVICES={inherited!r}; fix the devices option or unset "
                    "CUDA_VISIBLE_DEVICES"
                )
    elif configured is not None:
        candidates = configured
    else:
        candidates = list_visible_gpus()

    if not candidates:
        logger.info("no GPU found; running on the CPU")
        return DeviceAssignment(device_id=None, source=SOURCE_NONE)

    lock_root = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    device_id, path, waited_s = _claim(candidates, lock_root, wait_timeout_s)

    _warn_if_framework_imported()
    os.environ["CUDA_VISIBLE_DEVICES"] = device_id
    if inherited is None:
        # Index ids then mean what nvidia-smi shows, not CUDA's default fastest-first
        # order. Inherited ids keep the order they were written for.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

    logger.info(
        "claimed GPU %s of %s through %s after waiting %.1f s",
        device_id,
        candidates,
        path,
        waited_s,
    )
    _claimed = DeviceAssignment(
        device_id=device_id,
        source=SOURCE_LOCK,
        lock_path=path,
        waited_s=waited_s,
        candidates=candidates,
    )
    return _claimed
