"""Tests of wsiseg.geojson: writing, reading and shifting QuPath-style FeatureCollections."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import shapely

from wsiseg import geojson
from wsiseg.errors import ArtefactError, ConfigError

# The layout of older QuPath exports: one bare feature or a list of them, the class colour
# packed into one signed ARGB integer, and measurements as a list.
OLDER_QUPATH_FEATURES = [
    {
        "type": "Feature",
        "id": "PathAnnotationObject",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[100, 200], [100, 260], [180, 260], [180, 200], [100, 200]]],
        },
        "properties": {
            "name": "region 1",
            "classification": {"name": "Tumor", "colorRGB": -3670016},
            "isLocked": False,
            "measurements": [{"name": "Area px", "value": 4800.0}],
        },
    },
    {
        "type": "Feature",
        "id": "PathAnnotationObject",
        "geometry": {"type": "Point", "coordinates": [12.5, 40.25]},
        "properties": {"name": "point", "isLocked": False, "measurements": []},
    },
]


def square_feature(x0: float, y0: float, side: float, slide_id: str = "slide-g") -> dict:
    """Build a classified square annotation as vectorise writes it."""
    polygon = shapely.box(x0, y0, x0 + side, y0 + side)
    geometry_json = shapely.to_geojson(polygon)
    properties = geojson.annotation_properties(
        class_name="Tumor",
        class_color=[200, 0, 0],
        measurements={geojson.AREA_PX: polygon.area, geojson.AREA_UM2: None},
    )
    return json.loads(
        geojson.feature_text(
            id_=geojson.feature_id(slide_id, geometry_json),
            geometry_json=geometry_json,
            properties=properties,
        )
    )


def test_writer_round_trip(tmp_path: Path) -> None:
    """Features written as a FeatureCollection read back unchanged."""
    features = [square_feature(0, 0, 10), square_feature(20, 5, 4)]

    count = geojson.write_feature_collection(tmp_path / "out.geojson", features)

    assert count == 2
    document = json.loads((tmp_path / "out.geojson").read_text(encoding="utf-8"))
    assert document["type"] == "FeatureCollection"
    assert geojson.read_features(tmp_path / "out.geojson") == features


def test_writer_empty_collection(tmp_path: Path) -> None:
    """A writer with no features leaves a valid empty FeatureCollection."""
    with geojson.FeatureCollectionWriter(tmp_path / "empty.geojson"):
        pass

    document = json.loads((tmp_path / "empty.geojson").read_text(encoding="utf-8"))
    assert document == {"type": "FeatureCollection", "features": []}


def test_writer_file_permissions(tmp_path: Path) -> None:
    """The collection gets the permissions of a plain new file under the current umask."""
    umask = os.umask(0o022)
    try:
        geojson.write_feature_collection(tmp_path / "out.geojson", [])
    finally:
        os.umask(umask)

    assert (tmp_path / "out.geojson").stat().st_mode & 0o777 == 0o644


def test_writer_error_leaves_nothing(tmp_path: Path) -> None:
    """An exception inside the writer leaves neither the file nor a temporary file."""
    with pytest.raises(RuntimeError):
        with geojson.FeatureCollectionWriter(tmp_path / "out.geojson") as writer:
            writer.write(square_feature(0, 0, 10))
            raise RuntimeError("interrupted")

    assert list(tmp_path.iterdir()) == []


def test_writer_keeps_old_file_on_error(tmp_path: Path) -> None:
    """A failed rewrite keeps the previous complete file."""
    path = tmp_path / "out.geojson"
    geojson.write_feature_collection(path, [square_feature(0, 0, 10)])
    before = path.read_bytes()

    with pytest.raises(RuntimeError):
        with geojson.FeatureCollectionWriter(path):
            raise RuntimeError("interrupted")

    assert path.read_bytes() == before


def test_feature_layout() -> None:
    """A feature has a UUID id, annotation type, class with RGB colour and a measurement map."""
    feature = square_feature(0, 0, 10)

    assert uuid.UUID(feature["id"]).version == 5
    properties = feature["properties"]
    assert properties["objectType"] == "annotation"
    assert properties["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert properties["measurements"] == {"Area px": 100.0}


def test_feature_id_stable() -> None:
    """Feature ids depend on the slide and the geometry only."""
    first = geojson.feature_id("slide-a", '{"type":"Polygon"}')

    assert geojson.feature_id("slide-a", '{"type":"Polygon"}') == first
    assert geojson.feature_id("slide-b", '{"type":"Polygon"}') != first


def test_read_older_qupath_list(tmp_path: Path) -> None:
    """An older QuPath list export reads with colours unpacked and measurements as a map."""
    path = tmp_path / "export.json"
    path.write_text(json.dumps(OLDER_QUPATH_FEATURES))

    features = geojson.read_features(path)

    assert len(features) == 2
    assert features[0]["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert features[0]["properties"]["measurements"] == {"Area px": 4800.0}
    assert features[1]["properties"]["measurements"] == {}
    assert geojson.feature_geometries(features)[0].area == 80 * 60


def test_read_single_feature(tmp_path: Path) -> None:
    """A file with one bare Feature reads as a list of one."""
    path = tmp_path / "export.json"
    path.write_text(json.dumps(OLDER_QUPATH_FEATURES[0]))

    features = geojson.read_features(path)

    assert len(features) == 1
    assert features[0]["geometry"]["type"] == "Polygon"


@pytest.mark.parametrize(
    ("packed", "rgb"),
    [(-8397766, [127, 220, 58]), (-3670016, [200, 0, 0]), (-16777216, [0, 0, 0]), (-1, [255, 255, 255])],
)
def test_rgb_from_packed(packed: int, rgb: list[int]) -> None:
    """QuPath's packed ARGB integers unpack to their RGB triples."""
    assert geojson.rgb_from_packed(packed) == rgb


@pytest.mark.parametrize("color", [[300, 0, 0], [1, 2], "red", [1.5, 0, 0], [True, 0, 0], None])
def test_check_rgb_rejects(color: object) -> None:
    """Colours that are not three integers 0..255 are configuration errors."""
    with pytest.raises(ConfigError, match="class_color"):
        geojson.check_rgb(color)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    ["not json", '{"type": "Point", "coordinates": [0, 0]}', '{"type": "FeatureCollection", "features": 3}', "[1, 2]"],
)
def test_read_rejects_malformed(tmp_path: Path, text: str) -> None:
    """Files that are not GeoJSON features raise ArtefactError naming the file."""
    path = tmp_path / "bad.geojson"
    path.write_text(text)

    with pytest.raises(ArtefactError, match="bad.geojson"):
        geojson.read_features(path)


def test_read_missing_file(tmp_path: Path) -> None:
    """A missing GeoJSON file raises ArtefactError naming the path."""
    with pytest.raises(ArtefactError, match="absent.geojson"):
        geojson.read_features(tmp_path / "absent.geojson")


def test_shifted_copy(tmp_path: Path) -> None:
    """The shifted copy subtracts the offset from every coordinate and keeps the ids."""
    polygon_with_hole = shapely.Polygon(
        [(100, 100), (200, 100), (200, 200), (100, 200)], [[(120, 120), (140, 120), (140, 140), (120, 140)]]
    )
    feature = square_feature(0, 0, 1)
    feature["geometry"] = json.loads(shapely.to_geojson(polygon_with_hole))
    geojson.write_feature_collection(tmp_path / "full.geojson", [feature])

    count = geojson.write_shifted_copy(tmp_path / "full.geojson", tmp_path / "bounds.geojson", 30, 40.5)

    shifted = geojson.read_features(tmp_path / "bounds.geojson")
    assert count == 1
    assert shifted[0]["id"] == feature["id"]
    moved = shapely.geometry.shape(shifted[0]["geometry"])
    assert moved.equals(shapely.affinity.translate(polygon_with_hole, -30, -40.5))
    assert len(moved.interiors) == 1
