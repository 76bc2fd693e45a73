"""Tests of GPU slot assignment with real processes, real file locks and real Snakemake.

The device ids are fake (this machine has no GPU): the locking does not depend on a GPU
being present, and the ids only end up in CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wsiseg.devices import SOURCE_LOCK, SOURCE_NONE, SOURCE_SCHEDULER, assign_device
from wsiseg.errors import ConfigError

FAKE_DEVICES = ["fake0", "fake1"]

# A job that claims a slot, keeps it for a while, and appends its interval to a log.
HOLDER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from wsiseg.devices import assign_device

    devices, lock_dir, log_path, hold_s, timeout_s = sys.argv[1:6]
    configured = None if devices == "-" else devices.split(",")
    assignment = assign_device(configured, lock_dir, wait_timeout_s=float(timeout_s))
    start = time.time()
    print(json.dumps({"device": assignment.device_id,
                      "cuda": os.environ["CUDA_VISIBLE_DEVICES"]}), flush=True)
    time.sleep(float(hold_s))
    record = {"pid": os.getpid(), "device": assignment.device_id, "start": start,
              "end": time.time(), "cuda": os.environ["CUDA_VISIBLE_DEVICES"],
              "waited_s": assignment.waited_s}
    with open(log_path, "a") as stream:
        stream.write(json.dumps(record) + "\\n")
    """
)


def job_env() -> dict[str, str]:
    """Return an environment in which no scheduler has set CUDA_VISIBLE_DEVICES."""
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("CUDA_DEVICE_ORDER", None)
    return env


def start_holder(
    lock_dir: Path, log_path: Path, *, devices=FAKE_DEVICES, hold_s=1.0, timeout_s=60.0, env=None
):
    """Start one holder process and return its Popen; ``devices=None`` configures none."""
    device_list = "-" if devices is None else ",".join(devices)
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, device_list, str(lock_dir), str(log_path),
         str(hold_s), str(timeout_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or job_env(),
    )


def read_intervals(log_path: Path) -> list[dict]:
    """Return the holders' logged intervals."""
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def max_concurrent(intervals: list[dict]) -> int:
    """Return the largest number of intervals open at one instant."""
    events = sorted([(i["start"], 1) for i in intervals] + [(i["end"], -1) for i in intervals],
                    key=lambda event: (event[0], event[1]))
    open_now = peak = 0
    for _, change in events:
        open_now += change
        peak = max(peak, open_now)
    return peak


def overlapping_pairs_per_device(intervals: list[dict]) -> list[tuple[int, int]]:
    """Return pairs of holders whose intervals on the same device overlap."""
    pairs = []
    for a in intervals:
        for b in intervals:
            if a["pid"] < b["pid"] and a["device"] == b["device"]:
                if a["start"] < b["end"] and b["start"] < a["end"]:
                    pairs.append((a["pid"], b["pid"]))
    return pairs


@pytest.fixture
def cuda_env():
    """Restore CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER after a test that sets them."""
    saved = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    for name in saved:
        os.environ.pop(name, None)
    yield os.environ
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_holders_never_share_a_slot(tmp_path):
    """Five jobs on two slots: no slot held twice at once, never more than two holders."""
    log_path = tmp_path / "intervals.jsonl"
    processes = [start_holder(tmp_path / "locks", log_path) for _ in range(5)]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr

    intervals = read_intervals(log_path)
    assert len(intervals) == 5
    assert overlapping_pairs_per_device(intervals) == []
    assert max_concurrent(intervals) == 2
    assert {interval["device"] for interval in intervals} == set(FAKE_DEVICES)
    assert all(interval["cuda"] == interval["device"] for interval in intervals)


def test_killed_holder_frees_slot(tmp_path):
    """A slot held by a process killed with SIGKILL is free again at once."""
    lock_dir = tmp_path / "locks"
    log_path = tmp_path / "intervals.jsonl"
    holder = start_holder(lock_dir, log_path, devices=["fake0"], hold_s=600)
    try:
        claimed = json.loads(holder.stdout.readline())
        assert claimed["device"] == "fake0"

        # While the holder lives, another job cannot get the slot.
        blocked = start_holder(lock_dir, log_path, devices=["fake0"], hold_s=0, timeout_s=1.0)
        _, stderr = blocked.communicate(timeout=60)
        assert blocked.returncode != 0
        assert "timed out" in stderr

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.stdout.close()
        holder.stderr.close()

    started = time.monotonic()
    successor = start_holder(lock_dir, log_path, devices=["fake0"], hold_s=0, timeout_s=10.0)
    stdout, stderr = successor.communicate(timeout=60)
    assert successor.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[0])["device"] == "fake0"
    assert read_intervals(log_path)[-1]["waited_s"] < 1.0
    assert time.monotonic() - started < 30


def test_scheduler_device_is_respected(tmp_path, cuda_env):
    """A single device in CUDA_VISIBLE_DEVICES is used as given, without a lock."""
    cuda_env["CUDA_VISIBLE_DEVICES"] = "3"
    assignment = assign_device(FAKE_DEVICES, tmp_path / "locks")
    assert assignment.device_id == "3"
    assert assignment.source == SOURCE_SCHEDULER
    assert cuda_env["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (tmp_path / "locks").exists()


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_hidden_gpus_mean_cpu(tmp_path, cuda_env, hidden):
    """CUDA_VISIBLE_DEVICES empty or -1 runs on the CPU."""
    cuda_env["CUDA_VISIBLE_DEVICES"] = hidden
    assignment = assign_device(None, tmp_path / "locks")
    assert assignment.device_id is None
    assert assignment.label == "cpu"


def test_inherited_list_is_claimed_by_lock(tmp_path):
    """Several devices in CUDA_VISIBLE_DEVICES are shared out by locks, one per job."""
    lock_dir = tmp_path / "locks"
    log_path = tmp_path / "intervals.jsonl"
    env = dict(job_env(), CUDA_VISIBLE_DEVICES="3,5")
    holders = [start_holder(lock_dir, log_path, devices=None, hold_s=600, env=env) for _ in range(2)]
    try:
        claimed = [json.loads(holder.stdout.readline())["device"] for holder in holders]
        assert sorted(claimed) == ["3", "5"]

        blocked = start_holder(lock_dir, log_path, devices=None, hold_s=0, timeout_s=1.0, env=env)
        _, stderr = blocked.communicate(timeout=60)
        assert blocked.returncode != 0
        assert "timed out" in stderr

        holders[0].send_signal(signal.SIGKILL)
        holders[0].wait(timeout=30)
        successor = start_holder(lock_dir, log_path, devices=None, hold_s=0, timeout_s=10.0, env=env)
        stdout, stderr = successor.communicate(timeout=60)
        assert successor.returncode == 0, stderr
        assert json.loads(stdout.splitlines()[0])["device"] == claimed[0]
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
                holder.wait(timeout=30)
            holder.stdout.close()
            holder.stderr.close()


def test_second_claim_returns_same_device(tmp_path, cuda_env):
    """A process that has claimed a device gets the same one on a second call."""
    first = assign_device(FAKE_DEVICES, tmp_path / "locks")
    try:
        second = assign_device(FAKE_DEVICES, tmp_path / "locks")
        assert second.device_id == first.device_id
        assert second.source == SOURCE_LOCK
    finally:
        first.release()


def test_configured_ids_narrow_inherited_list(tmp_path, cuda_env):
    """Configured ids outside CUDA_VISIBLE_DEVICES raise ConfigError."""
    cuda_env["CUDA_VISIBLE_DEVICES"] = "3,5"
    with pytest.raises(ConfigError, match="none of the configured devices"):
        assign_device(["0", "1"], tmp_path / "locks")


def test_no_gpu_runs_on_cpu(tmp_path, cuda_env, monkeypatch, caplog):
    """Without nvidia-smi on the PATH and no devices configured, the job runs on the CPU."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="wsiseg.devices"):
        assignment = assign_device(None, tmp_path / "locks")
    assert assignment.source == SOURCE_NONE
    assert any("running on the CPU" in record.getMessage() for record in caplog.records)


def test_empty_device_list_hides_gpus(tmp_path, cuda_env):
    """An empty configured list runs on the CPU with every GPU hidden."""
    assignment = assign_device([], tmp_path / "locks")
    assert assignment.label == "cpu"
    assert cuda_env["CUDA_VISIBLE_DEVICES"] == ""


def test_rejects_unsafe_device_id(tmp_path, cuda_env):
    """A device id that could leave the lock directory raises ConfigError."""
    with pytest.raises(ConfigError, match="invalid device id"):
        assign_device(["../x"], tmp_path / "locks")


SNAKEFILE = textwrap.dedent(
    """
    rule all:
        input:
            expand("done/{{index}}.json", index=range({n_jobs})),

    rule hold_gpu:
        output:
            "done/{{index}}.json",
        resources:
            gpu=1,
        shell:
            "{python} {script} fake0,fake1 locks {log} 1.5 60 > {{output}}"
    """
)


def test_snakemake_jobs_get_distinct_gpus(tmp_path):
    """Under snakemake --resources gpu=2, concurrent jobs hold different slots."""
    script = tmp_path / "hold.py"
    script.write_text(HOLDER_SCRIPT)
    log_path = tmp_path / "intervals.jsonl"
    n_jobs = 6
    (tmp_path / "Snakefile").write_text(
        SNAKEFILE.format(n_jobs=n_jobs, python=sys.executable, script=script, log=log_path)
    )

    completed = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", str(n_jobs), "--resources", "gpu=2",
         "--snakefile", str(tmp_path / "Snakefile"), "--directory", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=job_env(), check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    intervals = read_intervals(log_path)
    assert len(intervals) == n_jobs
    assert overlapping_pairs_per_device(intervals) == []
    assert max_concurrent(intervals) == 2
    # Snakemake admits a job only when a slot is free, so no job waits for a lock.
    assert max(interval["waited_s"] for interval in intervals) < 1.0
