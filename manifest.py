"""manifest.json: what a build folder holds and how to use it, and the one way a build
folder is written (`BuildCommit`: into a hidden sibling, manifest last, renamed into
place).  Part of the build-folder contract; torch-free (the runtime reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from avg_edge import constants as C
from avg_edge.errors import AvgEdgeError, BuildFolderError, UsageError
from avg_edge.specs import CACHE_OPS, DecoderRoles, GraphSpec

REBUILD = "rebuild with avg-export build"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Required manifest keys and their JSON types (a bad build folder is named by key, not by a KeyError).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "precision": str, "opset": int, "granularities": list, "pinpoints": list,
    "crop_size": int, "image_mean": list, "image_std": list, "chat_template": dict, "bos_token_id": int,
    "eos_token_id": int, "context_length": int, "hidden_size": int, "has_router": bool, "kv_cache": str, "graphs": dict,
}
# Optional keys and their JSON types (absent: the field's default).
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "files": dict, "validation": dict, "tools": dict, "source": dict, "tensorrt": (dict, type(None)), "engines": dict,
    "quantization": (dict, type(None)), "drift": (dict, type(None)), "realign": (dict, type(None)), "phases": list,
    "router": (dict, type(None)), "cache_op": (str, type(None)),
}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Values the runtime computes with: key -> (test, what it should be).
_VALUES: dict[str, tuple[Any, str]] = {
    "opset": (_positive_int, "a positive integer"),
    "crop_size": (_positive_int, "a positive integer"),
    "context_length": (_positive_int, "a positive integer"),
    "hidden_size": (_positive_int, "a positive integer"),
    "bos_token_id": (lambda v: v >= 0, "a token id >= 0"),
    "eos_token_id": (lambda v: v >= 0, "a token id >= 0"),
    "granularities": (lambda v: bool(v) and all(map(_positive_int, v)) and v == sorted(set(v)),
                      "positive integers in ascending order"),
    "pinpoints": (lambda v: bool(v) and all(isinstance(p, list) and len(p) == 2 and all(map(_positive_int, p))
                                            for p in v), "a list of [width, height] pairs"),
    "image_mean": (lambda v: len(v) == 3 and all(map(_finite, v)), "3 numbers"),
    "image_std": (lambda v: len(v) == 3 and all(_finite(x) and x > 0 for x in v), "3 positive numbers"),
    "files": (lambda v: all(isinstance(i, dict) for i in v.values()), "an object of {sha256, bytes} per file"),
    "cache_op": (lambda v: v is None or v in CACHE_OPS, f"null or one of {list(CACHE_OPS)}"),
}


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
    chat_template: dict[str, Any]               # runtime.chat.ChatTemplate fields
    bos_token_id: int
    eos_token_id: int
    context_length: int
    hidden_size: int
    has_router: bool
    kv_cache: str                               # "inplace" or "concat" (specs.DecoderRoles.kind)
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
    phases: list[dict[str, Any]] = field(default_factory=list)        # the build's phases: seconds, peak RSS
    # has_router: {"text_file": the per-token table, "text_candidates": k, "text_from": "prompt" | "question",
    #              "alignment": {"loss": "rglf", "token_cost": lambda, "by": "training" | "avg-export realign"}}
    router: dict[str, Any] | None = None
    # kv_cache inplace: its operators, specs.CACHE_OPS (absent in builds before it: gqa)
    cache_op: str | None = None

    @property
    def in_place_op(self) -> str | None:
        """The in-place cache's operators, or None for a concat cache."""
        return (self.cache_op or "gqa") if self.kv_cache == "inplace" else None

    def spec(self, graph: str) -> GraphSpec:
        if graph not in self.graphs:
            raise BuildFolderError(f"this build has no '{graph}' graph; it has {sorted(self.graphs)}")
        return GraphSpec.from_dict(self.graphs[graph])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: Any, where: str = C.MANIFEST_FILE) -> "Manifest":
        """Unknown keys are ignored; a missing key or a value of the wrong type is a
        BuildFolderError naming it."""
        if not isinstance(d, dict):
            raise BuildFolderError(f"{where}: expected a JSON object, got {type(d).__name__}; {REBUILD}")
        for key, kind in _REQUIRED.items():
            if key not in d:
                raise BuildFolderError(f"{where}: missing key '{key}'; {REBUILD}")
            if not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool)):
                raise BuildFolderError(f"{where}: '{key}' should be {_type_word(kind)}, got {d[key]!r:.60}; {REBUILD}")
        for key, kind in _OPTIONAL.items():
            if key in d and not isinstance(d[key], kind):
                raise BuildFolderError(f"{where}: '{key}' should be {_type_word(kind)}, got {d[key]!r:.60}; {REBUILD}")
        for key, (ok, what) in _VALUES.items():
            if key in d and not ok(d[key]):
                raise BuildFolderError(f"{where}: '{key}' should be {what}, got {d[key]!r:.60}; {REBUILD}")
        names = set(cls.__dataclass_fields__)
        m = cls(**{k: v for k, v in d.items() if k in names})
        for name, g in m.graphs.items():
            try:
                GraphSpec.from_dict(g)
            except (KeyError, TypeError, ValueError) as e:
                raise BuildFolderError(f"{where}: graph '{name}' is malformed ({type(e).__name__}: {e}); {REBUILD}") from e
        if m.has_router and not (isinstance(m.router, dict) and isinstance(m.router.get("text_file"), str)
                                 and isinstance(m.router.get("text_candidates"), int)
                                 and m.router.get("text_from") in C.ROUTER_TEXT_FROM):
            raise BuildFolderError(f"{where}: 'router' should be an object with 'text_file', 'text_candidates' and "
                                   f"'text_from' (one of {list(C.ROUTER_TEXT_FROM)}) when has_router is true, "
                                   f"got {m.router!r:.80}; {REBUILD}")
        if "decoder" in m.graphs and DecoderRoles(m.spec("decoder")).kind != m.kv_cache:
            raise BuildFolderError(f"{where}: 'kv_cache' is {m.kv_cache!r} but the decoder's inputs are of the other kind; "
                                   f"{REBUILD}")
        return m

    def record_files(self, folder: Path) -> None:
        """sha256 and size of every file in the folder except the manifest itself."""
        self.files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != C.MANIFEST_FILE
        }

    def named_files(self) -> list[tuple[str, Any]]:
        """Every file the manifest names, with the key that names it: listed files, graph
        files, engines, the router's table."""
        return [*(("files entry", n) for n in self.files),
                *((f"graphs.{g}.file", spec.get("file", "")) for g, spec in self.graphs.items()),
                *((f"engines.{g}", n) for g, n in self.engines.items()),
                *([("router.text_file", self.router["text_file"])] if self.router and "text_file" in self.router else [])]


def _type_word(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_type_word(k) for k in kind)
    return {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true or false",
            type(None): "null"}.get(kind, str(kind))


def inside(folder: Path, name: Any, what: str, error: type[AvgEdgeError] = BuildFolderError,
           hint: str = REBUILD, links_out: bool = False) -> Path:
    """folder / name, refusing names that leave the folder (absolute, '..') and, unless
    `links_out`, links that lead out of it, with `error` (a build folder's or a
    checkpoint's) naming `what` and the name.  Checkpoints pass links_out: the Hugging
    Face cache and editable installs link their files from elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(f"{folder}: {what}: expected a file name inside the folder, got {name!r}; {hint}")
    path = folder / name
    if not links_out and not path.resolve().is_relative_to(folder.resolve()):
        raise error(f"{folder}: {what}: expected a file inside the folder, got {name!r}, which leads outside it; {hint}")
    return path


def load_manifest(folder: str | Path, verify: bool = False) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise BuildFolderError(f"build folder not found: {folder} (make one with: avg-export build -o {folder})")
    path = folder / C.MANIFEST_FILE
    if not path.is_file():
        raise BuildFolderError(f"{folder}: no {C.MANIFEST_FILE}; not a complete build ({REBUILD})")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildFolderError(f"{path}: not valid UTF-8 JSON ({e}); {REBUILD}") from e
    if not isinstance(d, dict):
        raise BuildFolderError(f"{path}: expected a JSON object, got {type(d).__name__}; {REBUILD}")
    version = d.get("format_version")
    if version not in C.MANIFEST_FORMATS_READ:
        older = [v for v in C.MANIFEST_FORMATS_READ if v != C.MANIFEST_FORMAT]
        raise BuildFolderError(
            f"{folder}: build format version {version}, this avg-edge reads version {C.MANIFEST_FORMAT}"
            + (f" (and {', '.join(map(str, older))})" if older else "") + f"; {REBUILD} of this version"
        )
    m = Manifest.from_dict(d, where=str(path))
    for key, name in m.named_files():
        inside(folder, name, f"{C.MANIFEST_FILE} {key}")
    missing = [n for n in m.files if not (folder / n).is_file()]
    if missing:
        raise BuildFolderError(f"{folder}: missing file(s) {missing} listed in the manifest; {REBUILD}")
    if verify:
        bad = [n for n, info in m.files.items() if sha256_file(folder / n) != info.get("sha256")]
        if bad:
            raise BuildFolderError(f"{folder}: checksum mismatch for {bad} (corrupt or modified); {REBUILD}")
    return m


# -- writing a build folder ---------------------------------------------------------------
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:building|old|work)-(?P<pid>\d+)$")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:            # another file system, or links not allowed
        shutil.copy2(src, dst)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(parent: Path) -> list[Path]:
    """Remove `.NAME.building-PID` (and .old-/.work-) folders whose process is gone: what
    a killed build leaves behind.  Folders of running builds are kept."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _process_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def signals_wait() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are raised again after it, to the
    handlers that were in place (Python runs signal handlers in the main thread only, so
    elsewhere there is nothing to hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


class BuildCommit:
    """Write a build folder atomically.

        with BuildCommit(out) as commit:        # commit.folder: a hidden sibling of `out`
            ... write files into commit.folder ...
            commit.finish(manifest)             # sha256 of every file, manifest last, rename

    Leaving the block without `finish` (an error, Ctrl-C, SIGTERM) removes the hidden
    folder and leaves `out` as it was; a killed process (SIGKILL) leaves the hidden folder,
    which the next build into the same parent removes.  SIGTERM is turned into
    KeyboardInterrupt inside the block (when Python's default handler is in place and
    this is the main thread), so `kill PID` cleans up as Ctrl-C does.  `start_from` copies an existing build first
    (realign, engines) as hard links (files are replaced, never edited in place, so the
    old build is unaffected; a 14 GB build is not copied).  `scratch()` gives a second
    hidden folder removed at the end."""

    def __init__(self, out: str | Path, start_from: str | Path | None = None) -> None:
        self.out = Path(out)
        self.parent = self.out.parent
        self.folder = self.parent / f".{self.out.name}.building-{os.getpid()}"
        self._scratch = self.parent / f".{self.out.name}.work-{os.getpid()}"
        self.start_from = Path(start_from) if start_from is not None else None
        self.finished = False
        self._previous_sigterm: Any = None

    def __enter__(self) -> "BuildCommit":
        self._catch_sigterm()
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.parent)
            shutil.rmtree(self.folder, ignore_errors=True)
            if self.start_from is not None:
                shutil.copytree(self.start_from, self.folder, copy_function=_link_or_copy)
                (self.folder / C.MANIFEST_FILE).unlink(missing_ok=True)
            else:
                self.folder.mkdir()
        except OSError as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._restore_sigterm()
            raise UsageError(f"cannot write the output {self.out}: {e.strerror or e}") from e
        return self

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def terminated(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"terminated by signal {signum}")

        self._previous_sigterm = signal.signal(signal.SIGTERM, terminated)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def scratch(self) -> Path:
        self._scratch.mkdir(exist_ok=True)
        return self._scratch

    def finish(self, manifest: Manifest | None) -> None:
        """Record and write the manifest (None: a folder that is not a build, such as a
        Triton model repository), then put the folder in place of `out`."""
        if manifest is not None:
            manifest.record_files(self.folder)
            (self.folder / C.MANIFEST_FILE).write_text(manifest.to_json())
        with signals_wait():     # Ctrl-C or SIGTERM between the two renames would leave no `out`
            if self.out.exists():
                old = self.parent / f".{self.out.name}.old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.folder, self.out)
            else:
                os.rename(self.folder, self.out)
                old = None
            self.finished = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: Any) -> None:
        try:
            shutil.rmtree(self._scratch, ignore_errors=True)
            if not self.finished:
                shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self._restore_sigterm()
