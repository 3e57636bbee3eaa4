"""manifest.json: what a build folder holds and how to use it.  Torch-free: the runtime
reads it, checks the format version and (with verify) every file's sha256."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avg_edge import constants as C
from avg_edge.errors import AvgEdgeError
from avg_edge.export.specs import GraphSpec


class BuildFolderError(AvgEdgeError):
    """A build folder is missing, incomplete, corrupt or of another format."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    format_version: int
    precision: str
    opset: int
    granularities: list[int]
    pinpoints: list[list[int]]                  # (width, height)
    crop_size: int
    image_mean: list[float]
    image_std: list[float]
    chat_template: dict[str, str]               # {"before_image": ..., "after_image": ... "{question}" ...}
    bos_token_id: int
    eos_token_id: int
    context_length: int
    hidden_size: int
    has_router: bool
    graphs: dict[str, dict[str, Any]]           # name -> GraphSpec.to_dict()
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> {sha256, bytes}
    validation: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    tensorrt: dict[str, Any] | None = None
    engines: dict[str, str] = field(default_factory=dict)             # graph -> engine file
    quantization: dict[str, Any] | None = None                        # int8/int4: method per graph, calibration data
    drift: dict[str, Any] | None = None                               # int8/int4: the drift report against fp32
    realign: dict[str, Any] | None = None                             # after avg-export realign: its report

    def spec(self, graph: str) -> GraphSpec:
        if graph not in self.graphs:
            raise BuildFolderError(f"this build has no '{graph}' graph; it has {sorted(self.graphs)}")
        return GraphSpec.from_dict(self.graphs[graph])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def record_files(self, folder: Path) -> None:
        """sha256 and size of every file in the folder except the manifest itself."""
        self.files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != C.MANIFEST_FILE
        }


def load_manifest(folder: str | Path, verify: bool = False) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise BuildFolderError(f"build folder not found: {folder} (make one with: avg-export build -o {folder})")
    path = folder / C.MANIFEST_FILE
    if not path.is_file():
        raise BuildFolderError(f"{folder}: no {C.MANIFEST_FILE}; not a complete build (rebuild with avg-export build)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BuildFolderError(f"{path}: not valid JSON ({e})") from e
    version = d.get("format_version")
    if version != C.MANIFEST_FORMAT:
        raise BuildFolderError(
            f"{folder}: build format version {version}, this avg-edge reads version {C.MANIFEST_FORMAT}; "
            "rebuild with this version's avg-export build"
        )
    m = Manifest.from_dict(d)
    missing = [n for n in m.files if not (folder / n).is_file()]
    if missing:
        raise BuildFolderError(f"{folder}: missing file(s) {missing} listed in the manifest; rebuild")
    if verify:
        bad = [n for n, info in m.files.items() if sha256_file(folder / n) != info["sha256"]]
        if bad:
            raise BuildFolderError(f"{folder}: checksum mismatch for {bad} (corrupt or modified); rebuild")
    return m
