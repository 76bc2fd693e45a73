"""GeoJSON FeatureCollections in the layout QuPath writes and reads.

Each feature is one annotation: a UUID ``id``, a Polygon geometry (outer ring first, then
holes) and ``properties`` with ``objectType``, ``classification`` ``{"name", "color"}`` and
a ``measurements`` map ``{name: number}``. Coordinates are level-0 pixels, x right, y down.

The reader also accepts the forms of older QuPath exports: a bare list of features or a single
feature, classifications that carry a packed ``colorRGB`` integer instead of ``color``, and
measurements given as a list of ``{"name", "value"}`` entries.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import shapely
from shapely.geometry.base import BaseGeometry

from wsiseg.errors import ArtefactError, ConfigError

logger = logging.getLogger(__name__)

# Namespace of the feature ids: uuid5 of the slide id and the geometry, so a rerun on the
# same map writes the same ids and a diff between two runs shows only real changes.
FEATURE_ID_NAMESPACE = uuid.UUID("6f1c2b2e-52a4-4c0e-9d7e-3f0b5d2a8c41")

AREA_UM2 = "Area µm^2"
AREA_PX = "Area px"


def feature_id(slide_id: str, geometry_json: str) -> str:
    """Return a UUID string that is stable for one geometry of one slide."""
    return str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"{slide_id}\n{geometry_json}"))


def check_rgb(color: Sequence[int], *, name: str = "class_color") -> list[int]:
    """Return ``color`` as ``[r, g, b]`` ints in 0..255, or raise ConfigError."""
    values = list(color) if isinstance(color, Sequence) and not isinstance(color, str) else None
    if values is None or len(values) != 3:
        raise ConfigError(f"{name} must be three integers [r, g, b], got {color!r}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise ConfigError(f"{name} must contain integers from 0 to 255, got {color!r}")
    return values


def rgb_from_packed(value: int) -> list[int]:
    """Unpack QuPath's ``colorRGB`` (a signed 32-bit ARGB integer) into ``[r, g, b]``."""
    packed = int(value) & 0xFFFFFF
    return [(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF]


def annotation_properties(
    *,
    class_name: str,
    class_color: Sequence[int],
    measurements: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ``properties`` object of one classified annotation.

    Measurements whose value is None are left out, because QuPath measurements are
    numbers: an area in µm² is absent, not null, where the MPP is unknown.
    """
    properties: dict[str, Any] = {
        "objectType": "annotation",
        "classification": {"name": class_name, "color": check_rgb(class_color)},
        "isLocked": False,
        "measurements": {key: value for key, value in measurements.items() if value is not None},
    }
    if extra:
        properties.update(extra)
    return properties


def feature_text(*, id_: str, geometry_json: str, properties: Mapping[str, Any]) -> str:
    """Serialise one feature from a geometry that is already GeoJSON text.

    The geometry comes from ``shapely.to_geojson``, which writes coordinates in C, so only
    the small ``properties`` object goes through Python's json module.
    """
    properties_json = json.dumps(properties, ensure_ascii=False, allow_nan=False)
    return (
        f'{{"type": "Feature", "id": {json.dumps(id_)}, '
        f'"geometry": {geometry_json}, "properties": {properties_json}}}'
    )


class FeatureCollectionWriter:
    """Stream features into a FeatureCollection file that appears only when complete.

    Features go to a temporary sibling of ``path``. Leaving the ``with`` block normally
    closes the collection and renames the file onto ``path``. An exception deletes the
    temporary file, so a partial collection is never found under the final name.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.n_features = 0
        self._temp: Path | None = None
        self._stream: Any = None

    def __enter__(self) -> FeatureCollectionWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".tmp-{self.path.name}-", dir=self.path.parent)
        self._temp = Path(name)
        # mkstemp creates the file readable by its owner only. Give it the permissions a
        # plain open() would, so collaborators can read the results.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle, 0o666 & ~umask)
        self._stream = os.fdopen(handle, "w", encoding="utf-8")
        self._stream.write('{"type": "FeatureCollection", "features": [')
        return self

    def write_text(self, text: str) -> None:
        """Append one feature given as serialised JSON text."""
        separator = "\n" if self.n_features == 0 else ",\n"
        self._stream.write(separator + text)
        self.n_features += 1

    def write(self, feature: Mapping[str, Any]) -> None:
        """Append one feature given as a GeoJSON mapping."""
        self.write_text(json.dumps(feature, ensure_ascii=False, allow_nan=False))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stream, temp = self._stream, self._temp
        if exc_type is not None:
            stream.close()
            temp.unlink(missing_ok=True)
            return
        try:
            stream.write("\n]}\n")
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
            os.replace(temp, self.path)
        except BaseException:
            stream.close()
            temp.unlink(missing_ok=True)
            raise


def write_feature_collection(path: str | os.PathLike, features: Iterable[Mapping[str, Any]]) -> int:
    """Write ``features`` as a FeatureCollection atomically and return how many were written."""
    with FeatureCollectionWriter(path) as writer:
        for feature in features:
            writer.write(feature)
    return writer.n_features


def _normalise_properties(properties: Mapping[str, Any] | None) -> dict[str, Any]:
    properties = dict(properties or {})

    # Older QuPath exports pack the class colour into one signed ARGB integer.
    classification = properties.get("classification")
    if isinstance(classification, Mapping):
        classification = dict(classification)
        if "color" not in classification and "colorRGB" in classification:
            classification["color"] = rgb_from_packed(classification.pop("colorRGB"))
        properties["classification"] = classification

    # Older QuPath exports write measurements as a list of {"name", "value"} entries.
    measurements = properties.get("measurements")
    if isinstance(measurements, list):
        properties["measurements"] = {
            entry["name"]: entry["value"]
            for entry in measurements
            if isinstance(entry, Mapping) and "name" in entry and "value" in entry
        }
    elif measurements is None:
        properties["measurements"] = {}
    return properties


def read_features(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the features of a GeoJSON file written by wsiseg or exported by QuPath.

    Accepts a FeatureCollection, a list of features or one feature, and normalises each
    feature's properties to the current layout (``classification.color`` as ``[r, g, b]``,
    ``measurements`` as a map). Raises ArtefactError for a missing or malformed file.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except FileNotFoundError as error:
        raise ArtefactError(f"GeoJSON file not found: {path}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtefactError(f"invalid GeoJSON in {path}: {error}") from error

    if isinstance(document, Mapping) and document.get("type") == "FeatureCollection":
        raw_features = document.get("features")
    elif isinstance(document, Mapping) and document.get("type") == "Feature":
        raw_features = [document]
    elif isinstance(document, list):
        raw_features = document
    else:
        raise ArtefactError(
            f"expected a FeatureCollection, a Feature or a list of features in {path}"
        )
    if not isinstance(raw_features, list):
        raise ArtefactError(f"'features' of {path} is not a list")

    features = []
    for index, raw in enumerate(raw_features):
        if not isinstance(raw, Mapping) or raw.get("type") != "Feature":
            raise ArtefactError(f"item {index} of {path} is not a GeoJSON Feature")
        feature = dict(raw)
        feature["properties"] = _normalise_properties(raw.get("properties"))
        features.append(feature)
    return features


def feature_geometries(features: Iterable[Mapping[str, Any]]) -> list[BaseGeometry]:
    """Convert the features' geometries to shapely objects, in order."""
    return [shapely.geometry.shape(feature["geometry"]) for feature in features]


def shift_features(
    features: Iterable[Mapping[str, Any]], offset_x: float, offset_y: float
) -> list[dict[str, Any]]:
    """Return copies of ``features`` with every coordinate reduced by the offset.

    QuPath shows MIRAX and Leica slides cropped to their bounds, so level-0 coordinates
    of the full slide must have the bounds' top-left corner subtracted to line up there.
    """
    shifted = []
    for feature in features:
        geometry = shapely.geometry.shape(feature["geometry"])
        moved = shapely.transform(geometry, lambda coords: coords - [offset_x, offset_y])
        copy = dict(feature)
        copy["geometry"] = json.loads(shapely.to_geojson(moved))
        shifted.append(copy)
    return shifted


def write_shifted_copy(
    source: str | os.PathLike, target: str | os.PathLike, offset_x: float, offset_y: float
) -> int:
    """Write a copy of the GeoJSON ``source`` shifted by the offset; return its size."""
    features = shift_features(read_features(source), offset_x, offset_y)
    return write_feature_collection(target, features)
