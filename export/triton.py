"""`avg-export triton BUILD_DIR OUT`: a Triton Inference Server model repository.

    OUT/
      vision/        config.pbtxt, 1/<graph>        onnxruntime | tensorrt | python backend
      router/        config.pbtxt, 1/<graph>        (python: 1/model.py runs ONNX Runtime)
      avg_edge/      config.pbtxt, 1/model.py, 1/build/   the decoupled orchestrator

Clients call `avg_edge` (image bytes, prompt, optional granularity, token budget and
sampling) and get a stream of text pieces with the granularity, visual tokens and
finish reason.  The orchestrator is the runtime's Pipeline; its vision and router calls
go to the other two models through BLS, its decoder loop and KV cache stay in-process
(runtime/triton.py).  Names, dtypes and dims come from the build's specs.

Vision and router get `--instances` instance groups but no dynamic batching: their
leading axis is the crops of ONE image, and the router's merger attends across that
axis, so stacking two requests' crops would mix the images.  Written atomically (a
hidden sibling renamed into place); torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge.errors import UsageError
from avg_edge.manifest import BuildCommit, Manifest, inside, load_manifest
from avg_edge.runtime.triton import ORCHESTRATOR_INPUTS, ORCHESTRATOR_OUTPUTS
from avg_edge.specs import GraphSpec, TensorSpec

BACKENDS = ("python", "onnxruntime", "tensorrt")
ORCHESTRATOR = "avg_edge"
BUILD_SUBFOLDER = "build"
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}

MODEL_PY = '''"""Written by avg-export triton: hands Triton's calls to avg_edge.runtime.triton.{cls}.
The Python backend's stub ignores PYTHONPATH: the folders holding avg_edge and its
dependencies are this model's config.pbtxt parameter avg_edge_path (edit it when the
repository moves to a machine where they live elsewhere)."""

import json
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        for folder in config["parameters"]["avg_edge_path"]["string_value"].split(":"):
            if folder and folder not in sys.path:
                sys.path.append(folder)
        from avg_edge.runtime.triton import {cls}

        self.impl = {cls}(pb_utils)
        self.impl.initialize(args)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        self.impl.finalize()
'''


@dataclass(frozen=True)
class TritonOptions:
    backend: str = "python"           # how vision and router run: python (ORT inside Triton), onnxruntime, tensorrt
    instances: int = 1                # instance groups of vision and router
    orchestrators: int = 1            # instances of the orchestrator (concurrent requests)
    threads: int = 0                  # ONNX Runtime threads per python-backend instance (0: its default)
    force: bool = False


def _dims(t: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in t.shape]


def _tensor(t: TensorSpec) -> str:
    if t.dtype not in _TYPES:
        raise UsageError(f"{t.name}: dtype {t.dtype} has no Triton type here")
    return f'  {{ name: "{t.name}" data_type: {_TYPES[t.dtype]} dims: {_dims(t)} }}'


def _parameters(params: dict[str, str]) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}\n'
                   for k, v in params.items())


def graph_config(name: str, spec: GraphSpec, o: TritonOptions, file: str, python_path: str) -> str:
    """config.pbtxt of the vision or router model."""
    head = {"python": 'backend: "python"', "onnxruntime": 'backend: "onnxruntime"',
            "tensorrt": 'backend: "tensorrt"'}[o.backend]
    kind = "KIND_CPU" if o.backend == "python" else "KIND_GPU"
    text = (f'name: "{name}"\n{head}\nmax_batch_size: 0\n'
            + (f'default_model_filename: "{file}"\n' if o.backend != "python" else "")
            + "input [\n" + ",\n".join(_tensor(t) for t in spec.inputs) + "\n]\n"
            + "output [\n" + ",\n".join(_tensor(t) for t in spec.outputs) + "\n]\n"
            + f"instance_group [ {{ count: {o.instances} kind: {kind} }} ]\n")
    if o.backend == "python":
        text += _parameters({"avg_edge_spec": json.dumps(spec.to_dict()), "avg_edge_path": python_path,
                             "threads": str(o.threads)})
    return text


def orchestrator_config(o: TritonOptions, python_path: str, vision: str, router: str) -> str:
    ins = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if opt else ""} }}'
                     for n, t, d, opt in ORCHESTRATOR_INPUTS)
    outs = ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in ORCHESTRATOR_OUTPUTS)
    return (f'name: "{ORCHESTRATOR}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"
            f"instance_group [ {{ count: {o.orchestrators} kind: KIND_CPU }} ]\n"
            + _parameters({"avg_edge_path": python_path, "build_folder": BUILD_SUBFOLDER, "vision_model": vision,
                           "router_model": router, "threads": str(o.threads)}))


def python_path() -> str:
    """The folders this interpreter imports avg_edge and its dependencies from."""
    import avg_edge

    package_parent = str(Path(avg_edge.__file__).parent.parent)     # not resolved: an editable install links files
    folders = [p for p in sys.path if p and Path(p).is_dir() and ("site-packages" in p or "dist-packages" in p)]
    return ":".join(dict.fromkeys([package_parent, *folders]))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def onnx_files(folder: Path, m: Manifest, name: str) -> list[Path]:
    """A graph's ONNX file and its external data, if any."""
    main = inside(folder, m.spec(name).file, "graph file")
    return [main, *sorted(p for p in folder.glob(main.name + ".data") if p.is_file())]


def engine_files(folder: Path, m: Manifest, name: str) -> list[Path]:
    """A graph's TensorRT engine, when the build has one."""
    return [inside(folder, m.engines[name], "engine")] if name in m.engines else []


def write_repository(build_dir: str | Path, out: str | Path, o: TritonOptions) -> list[str]:
    """Write the repository; returns its model names."""
    folder, out = Path(build_dir), Path(out)
    if o.backend not in BACKENDS:
        raise UsageError(f"--backend: expected one of {list(BACKENDS)}, got {o.backend!r}")
    if o.instances < 1 or o.orchestrators < 1 or o.threads < 0:
        raise UsageError(f"--instances and --orchestrators: expected positive integers, --threads >= 0; got "
                         f"{o.instances}, {o.orchestrators}, {o.threads}")
    m = load_manifest(folder, verify=False)
    if out.exists() and not o.force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise UsageError(f"the repository {out} must not be inside the build folder {folder}")
    graphs = [g for g in (S.VISION, S.ROUTER) if g in m.graphs]
    path = python_path()
    with BuildCommit(out) as commit:
        repo = commit.folder
        skip: set[str] = set()
        for g in graphs:
            files = engine_files(folder, m, g) if o.backend == "tensorrt" else onnx_files(folder, m, g)
            if not files:
                raise UsageError(f"{folder}: no TensorRT engine for {g}; make them on the target GPU with "
                                 f"avg-export engines {folder}, or pass --backend onnxruntime|python")
            for f in files:
                _link(f, repo / g / "1" / f.name)
            skip.update(p.name for p in [*onnx_files(folder, m, g), *engine_files(folder, m, g)])
            if o.backend == "python":
                (repo / g / "1" / "model.py").write_text(MODEL_PY.format(cls="GraphModel"))
            (repo / g / "config.pbtxt").write_text(graph_config(g, m.spec(g), o, files[0].name, path))
        orch = repo / ORCHESTRATOR / "1"
        for f in sorted(folder.iterdir()):       # the build without the graphs Triton runs for it
            if f.is_file() and f.name not in skip and f.name != C.MANIFEST_FILE:
                _link(f, orch / BUILD_SUBFOLDER / f.name)
        m.files = {k: v for k, v in m.files.items() if k not in skip}   # its manifest lists what it holds
        (orch / BUILD_SUBFOLDER / C.MANIFEST_FILE).write_text(m.to_json())
        (orch / "model.py").write_text(MODEL_PY.format(cls="OrchestratorModel"))
        (repo / ORCHESTRATOR / "config.pbtxt").write_text(orchestrator_config(o, path, S.VISION, S.ROUTER))
        commit.finish(None)
    return [*graphs, ORCHESTRATOR]


class LocalTritonServer:
    """A tritonserver on loopback for a repository (tests, benchmarks, trying it on a CPU
    machine): the binary of a Triton install, or the one bundled in the nvidia-pytriton
    wheel (unpacked by make test into build/tritonserver).

    The Python backend's stub must load the libpython of the interpreter whose packages
    the models import (else: '_thread.RLock' object has no attribute
    '_recursion_count'), so that interpreter's LIBDIR goes first on LD_LIBRARY_PATH, and
    the stub for its Python version is put where the backend looks for it.

        with LocalTritonServer(repo, root) as server:    # waits until every model is ready
            server.grpc_url                              # "127.0.0.1:PORT"
    """

    def __init__(self, repository: Path, root: Path, timeout: float = 120.0) -> None:
        self.repository, self.root, self.timeout = Path(repository), Path(root), timeout
        self.binary = self.root / "bin" / "tritonserver"
        if not self.binary.is_file():
            raise UsageError(f"no tritonserver at {self.binary}: install Triton, or unpack the nvidia-pytriton wheel "
                             "(make test does: build/tritonserver/pytriton/tritonserver)")
        self.process = None
        self.log_file = self.repository.parent / f"{self.repository.name}.tritonserver.log"

    def _stub(self) -> None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        src = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        dst = self.root / "backends" / "python" / "triton_python_backend_stub"
        if src.is_file() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
            shutil.copy2(src, dst)

    def __enter__(self) -> "LocalTritonServer":
        import socket
        import subprocess
        import sysconfig
        import time
        import urllib.request

        self._stub()
        ports = []
        for _ in range(3):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        self.http_port, self.grpc_port, self.metrics_port = ports
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")) if p)
        cmd = [str(self.binary), "--model-repository", str(self.repository),
               "--backend-directory", str(self.root / "backends"), "--http-address", "127.0.0.1",
               "--grpc-address", "127.0.0.1", "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--allow-metrics", "true", "--log-verbose", "0"]
        self._log = open(self.log_file, "w")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__()
                raise UsageError(f"tritonserver exited ({self.process.returncode}); see {self.log_file}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise UsageError(f"tritonserver was not ready within {self.timeout:.0f} s; see {self.log_file}")

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def __exit__(self, *exc: object) -> None:
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)       # Triton's graceful stop: unloads models, stops stubs
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()


__all__ = ["LocalTritonServer", "TritonOptions", "write_repository", "graph_config", "orchestrator_config", "BACKENDS", "ORCHESTRATOR"]
