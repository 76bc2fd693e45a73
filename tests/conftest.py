"""Shared fixtures: the bundled real slides, synthetic slides and a front-stage runner.

Synthetic slides are generated once per test session under pytest's temporary
directory; each takes well under a second except where noted.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wsiseg import synthetic
from wsiseg.patches import run_patches
from wsiseg.slide import run_inspect
from wsiseg.tissue import run_tissue

DATA_DIR = Path(__file__).parent / "data"


# --- real slides (tests/data, see SOURCES.md) ------------------------------------------


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of bundled test slides."""
    return DATA_DIR


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """Aperio SVS, 2220 x 2967 px, one level, MPP 0.499."""
    return DATA_DIR / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def tiny_slide() -> Path:
    """Aperio SVS of 16 x 16 px, smaller than one patch."""
    return DATA_DIR / "tiny-16px.svs"


@pytest.fixture(scope="session")
def boxes_tiff() -> Path:
    """Generic tiled TIFF, 4 levels, resolution 28.35 px/cm (352.8 µm/px, implausible)."""
    return DATA_DIR / "boxes-generic.tiff"


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """Folder holding one DICOM WSI series of 16 x 16 px, MPP 0.499."""
    return DATA_DIR / "boxes-dicom"


# --- synthetic slides ------------------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session folder for generated slides."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def disc_slide(synthetic_dir: Path) -> synthetic.SyntheticSlide:
    """Two discs of radius 600 px on white, 4096 x 3072 px, MPP 0.5, levels 1, 4, 16."""
    return synthetic.disc_slide(synthetic_dir / "disc.tiff")


@pytest.fixture(scope="session")
def odd_pyramid_slide(synthetic_dir: Path) -> synthetic.SyntheticSlide:
    """Two discs on a 8191 x 6143 px pyramid whose downsamples are not integers."""
    return synthetic.disc_slide(
        synthetic_dir / "odd-pyramid.tiff",
        width_px=8191,
        height_px=6143,
        radius_px=1500.0,
        level_downsamples=(1.0, 4.000152, 16.0029),
    )


@pytest.fixture(scope="session")
def no_mpp_slide(synthetic_dir: Path) -> synthetic.SyntheticSlide:
    """The disc slide without resolution tags."""
    return synthetic.disc_slide(synthetic_dir / "no-mpp.tiff", mpp_um=None)


@pytest.fixture(scope="session")
def blank_slide(synthetic_dir: Path) -> synthetic.SyntheticSlide:
    """A plain white 2048 x 2048 px slide."""
    return synthetic.blank_slide(synthetic_dir / "blank.tiff")


@pytest.fixture(scope="session")
def pale_slide(synthetic_dir: Path) -> synthetic.SyntheticSlide:
    """A very pale pink 2048 x 2048 px slide with faint noise and no tissue."""
    return synthetic.blank_slide(synthetic_dir / "pale.tiff", pale=True)


@pytest.fixture(scope="session")
def huge_slide(synthetic_dir: Path) -> synthetic.SyntheticSlide:
    """A one-level 20,000 x 20,000 px TIFF (1.6 GB as RGBA), mostly white, three discs."""
    return synthetic.huge_single_level_slide(
        synthetic_dir / "huge.tiff", width_px=20_000, height_px=20_000
    )


# --- running the first stages ----------------------------------------------------------


@dataclasses.dataclass
class FrontStages:
    """Artefact paths of inspect, tissue and patches for one slide, and their records."""

    folder: Path
    slide: dict[str, Any]
    tissue: dict[str, Any] | None = None
    patches: dict[str, Any] | None = None

    @property
    def slide_json(self) -> Path:
        return self.folder / "slide.json"

    @property
    def tissue_json(self) -> Path:
        return self.folder / "tissue.json"

    @property
    def mask_png(self) -> Path:
        return self.folder / "tissue_mask.png"

    @property
    def thumbnail_png(self) -> Path:
        return self.folder / "thumbnail.png"

    @property
    def patches_zarr(self) -> Path:
        return self.folder / "patches.zarr"

    @property
    def shards_json(self) -> Path:
        return self.folder / "shards.json"

    def plan(self) -> dict[str, Any]:
        return json.loads(self.shards_json.read_text(encoding="utf-8"))


def _run_front_stages(
    root: Path,
    slide_path: str | Path,
    slide_id: str,
    *,
    until: str = "patches",
    inspect_options: dict[str, Any] | None = None,
    tissue_options: dict[str, Any] | None = None,
    patches_options: dict[str, Any] | None = None,
) -> FrontStages:
    folder = root / slide_id
    folder.mkdir(parents=True, exist_ok=True)
    stages = FrontStages(folder, {})
    stages.slide = run_inspect(slide_path, slide_id, stages.slide_json, **(inspect_options or {}))
    if until == "inspect":
        return stages
    stages.tissue = run_tissue(
        stages.slide_json,
        stages.mask_png,
        stages.thumbnail_png,
        stages.tissue_json,
        **(tissue_options or {}),
    )
    if until == "tissue":
        return stages
    stages.patches = run_patches(
        stages.slide_json,
        stages.tissue_json,
        stages.mask_png,
        stages.patches_zarr,
        stages.shards_json,
        **{"workers": 1, **(patches_options or {})},
    )
    return stages


@pytest.fixture
def front_stages(tmp_path: Path) -> Callable[..., FrontStages]:
    """Return a function that runs inspect, tissue and patches (workers=1 by default).

    Call it as ``front_stages(slide_path, slide_id, until="tissue", tissue_options={...})``.
    """

    def run(slide_path: str | Path, slide_id: str, **options: Any) -> FrontStages:
        return _run_front_stages(tmp_path, slide_path, slide_id, **options)

    return run


@pytest.fixture(scope="session")
def cmu_front_stages(
    tmp_path_factory: pytest.TempPathFactory, cmu_slide: Path
) -> FrontStages:
    """inspect, tissue and patches of the CMU slide with 2 workers, run once per session."""
    root = tmp_path_factory.mktemp("cmu-front")
    return _run_front_stages(root, cmu_slide, "cmu", patches_options={"workers": 2})


_MEASURE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from wsiseg.patches import run_patches
    from wsiseg.slide import run_inspect
    from wsiseg.tissue import run_tissue

    def peak_mib():
        # VmHWM is this process's own peak. ru_maxrss would also count the pages of a
        # large parent (pytest with TensorFlow loaded) copied by the fork before exec.
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if __name__ == "__main__":
        slide_path, folder = sys.argv[1], sys.argv[2]
        run_inspect(slide_path, "huge", folder + "/slide.json")
        tissue = run_tissue(folder + "/slide.json", folder + "/tissue_mask.png",
                            folder + "/thumbnail.png", folder + "/tissue.json")
        after_tissue_mib = peak_mib()
        patches = run_patches(folder + "/slide.json", folder + "/tissue.json",
                              folder + "/tissue_mask.png", folder + "/patches.zarr",
                              folder + "/shards.json", workers=1)
        print(json.dumps({
            "tissue": tissue,
            "patches": patches,
            "tissue_peak_mib": after_tissue_mib,
            "patches_peak_mib": peak_mib(),
        }))
    """
)


@pytest.fixture(scope="session")
def huge_slide_measured(
    tmp_path_factory: pytest.TempPathFactory, huge_slide: synthetic.SyntheticSlide
) -> dict[str, Any]:
    """inspect, tissue and patches of the huge slide in a fresh process, with peak RSS.

    Extraction runs in that process (workers=1), which runs the same code per chunk as
    a worker process. Returns tissue.json and the store attributes as "tissue" and
    "patches", the process's peak RSS in MiB after tissue detection and after extraction,
    and the artefacts' "folder".
    """
    folder = tmp_path_factory.mktemp("huge-front")
    script = folder / "measure.py"
    script.write_text(_MEASURE_SCRIPT)
    completed = subprocess.run(
        [sys.executable, str(script), str(huge_slide.path), str(folder)],
        capture_output=True, text=True, check=True, timeout=600,
    )
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    measured["folder"] = folder
    return measured
