"""Crash recovery: an inference job killed with SIGKILL mid-run, then the same command again.

The rerun must recompute only the shard that was lost and give the same probability map
as an uninterrupted run. No partial Zarr store may ever sit under a final name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
import zarr

from test_workflow import REPO, run_snakemake, small_config


def _infer_processes(parent: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in parent.children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "infer" in command and "--shard" in command and "python" in Path(child.cmdline()[0]).name:
            found.append(child)
    return found


def _kill_first_infer_job(workdir: Path, config: dict, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Start snakemake, SIGKILL the first inference job once it runs, and let snakemake finish."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--configfile", str(config_path), "--cores", "1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout_s
    killed = None
    while time.monotonic() < deadline and killed is None and process.poll() is None:
        for job in _infer_processes(parent):
            # Let the job import TensorFlow and start predicting before killing it.
            if time.time() - job.create_time() > 8:
                job.send_signal(signal.SIGKILL)
                killed = job
                break
        time.sleep(0.2)
    output, _ = process.communicate(timeout=timeout_s)
    if killed is None:
        pytest.fail(f"no inference job was seen running\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def test_killed_shard_recomputed_alone(tmp_path):
    """After a SIGKILL, the rerun recomputes one shard and matches an uninterrupted run."""
    config = small_config(tmp_path / "killed" / "results")
    killed_run = _kill_first_infer_job(tmp_path / "killed", config)
    assert killed_run.returncode != 0

    # Only complete stores may exist under final names after the kill.
    predictions = tmp_path / "killed" / "results" / "CMU-1-Small-Region" / "predictions"
    for store in predictions.glob("shard-*.zarr"):
        group = zarr.open_group(str(store), mode="r")
        assert "sum" in group
        assert "weight" in group

    rerun = run_snakemake(tmp_path / "killed", config)
    log = rerun.stdout + rerun.stderr
    assert log.count("rule infer_shard:") == 1

    reference_config = small_config(tmp_path / "reference" / "results")
    run_snakemake(tmp_path / "reference", reference_config)
    recovered = zarr.open_group(str(tmp_path / "killed/results/CMU-1-Small-Region/probability.zarr"), mode="r")
    reference = zarr.open_group(str(tmp_path / "reference/results/CMU-1-Small-Region/probability.zarr"), mode="r")
    np.testing.assert_allclose(recovered["probability"][:], reference["probability"][:], atol=1e-6)
