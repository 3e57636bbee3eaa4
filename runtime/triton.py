"""The code Triton Inference Server's Python backend runs for a repository written by
`avg-export triton` (export/triton.py writes the repository; torch-free).

Each model folder's `model.py` is a few lines: it puts the folders named in its
config.pbtxt parameter `avg_edge_path` on sys.path (the backend's stub ignores
PYTHONPATH) and hands every call to one of the classes here:

  GraphModel         vision or router: ONNX Runtime on the graph in its version folder
  OrchestratorModel  the decoupled (streaming) model clients call: image bytes + prompt
                     -> text pieces.  It is the runtime's own Pipeline, whose vision and
                     router backends call the vision and router models through BLS
                     (so Triton schedules, counts and scales them), with the decoder loop
                     and its KV cache in this process (a cache passed through Triton as
                     tensors each step would be copied twice per token).

`pb` is the backend's `triton_python_backend_utils` module, passed in (it only exists
inside the stub).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avg_edge import specs as S
from avg_edge.errors import (AvgEdgeError, BackendError, BuildFolderError, Busy, Cancelled, ImageError, InputError,
                             LimitError, UsageError, category_of)
from avg_edge.runtime.backends.base import Backend
from avg_edge.specs import GraphSpec

# The orchestrator's tensors (export/triton.py writes them into its config.pbtxt).
ORCHESTRATOR_INPUTS = (   # name, Triton type, dims, optional
    ("image", "TYPE_UINT8", [-1], False),
    ("prompt", "TYPE_UINT8", [-1], False),          # the question, UTF-8 bytes
    ("granularity", "TYPE_INT32", [1], True),        # 0 or absent: the router chooses
    ("max_tokens", "TYPE_INT32", [1], True),
    ("max_visual_tokens", "TYPE_INT32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
)
ORCHESTRATOR_OUTPUTS = (
    ("text", "TYPE_UINT8", [-1]),              # this response's piece of the answer, UTF-8
    ("granularity", "TYPE_INT32", [1]),
    ("visual_tokens", "TYPE_INT32", [1]),
    ("finish_reason", "TYPE_UINT8", [-1]),     # UTF-8; empty until the last response: "stop" or "length"
)
DEFAULT_MAX_TOKENS = 256


# Tensors cross the stub through DLPack, never its numpy conversion: the stub is compiled
# against numpy 1.x, and under numpy 2 its as_numpy() returns every element equal to the
# first (the array descriptor's layout changed), while DLPack has no numpy ABI in it.
def to_numpy(t: Any) -> np.ndarray:
    """A Triton tensor (an input, or a BLS output) as a numpy array of our own."""
    return np.array(np.from_dlpack(t), copy=True)


def to_triton(pb: Any, name: str, a: np.ndarray) -> Any:
    """A numpy array as a Triton tensor (DLPack needs a writeable, C-ordered array)."""
    return pb.Tensor.from_dlpack(name, np.require(a, requirements=("C", "W")))


def _parameter(config: dict, key: str) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError as e:
        raise UsageError(f"config.pbtxt of {config.get('name')!r}: missing parameter {key!r}; "
                         "rewrite the repository with avg-export triton") from e


def _error(pb: Any, e: BaseException) -> Any:
    """A Triton error for an exception: what the error table calls a client mistake or a
    limit (HTTP 4xx) is INVALID_ARG, the rest INTERNAL."""
    category = category_of(e)
    message = f"{category.name}: " + (str(e) if isinstance(e, AvgEdgeError) else f"{type(e).__name__}: {e}")
    client = category.http_status < 500
    code = getattr(pb.TritonError, "INVALID_ARG" if client else "INTERNAL", None)
    try:
        return pb.TritonError(message, code) if code is not None else pb.TritonError(message)
    except TypeError:   # an older stub: message only
        return pb.TritonError(message)


class GraphModel:
    """vision or router as a Triton Python-backend model: ONNX Runtime on the graph file
    in the model's version folder, inputs and outputs named by the build's spec."""

    def __init__(self, pb: Any) -> None:
        self.pb = pb

    def initialize(self, args: dict) -> None:
        from avg_edge.manifest import inside
        from avg_edge.runtime.backends.ort_backend import OrtBackend

        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        spec = GraphSpec.from_dict(json.loads(_parameter(config, "avg_edge_spec")))
        self.backend = OrtBackend(spec, inside(folder, spec.file, "config.pbtxt avg_edge_spec file"), threads=int(_parameter(config, "threads") or 0))

    def execute(self, requests: list) -> list:
        pb, spec = self.pb, self.backend.spec
        responses = []
        for request in requests:
            try:
                feeds = {t.name: to_numpy(pb.get_input_tensor_by_name(request, t.name)) for t in spec.inputs}
                out = self.backend.infer(feeds)
                responses.append(pb.InferenceResponse(output_tensors=[to_triton(pb, t.name, out[t.name])
                                                                      for t in spec.outputs]))
            except Exception as e:  # one bad request must not fail the batch
                responses.append(pb.InferenceResponse(output_tensors=[], error=_error(pb, e)))
        return responses

    def finalize(self) -> None:
        self.backend.close()


class BlsBackend(Backend):
    """A graph run by another model of the same Triton server (Business Logic Scripting)."""

    name = "triton-bls"

    def __init__(self, spec: GraphSpec, pb: Any, model_name: str) -> None:
        super().__init__(spec)
        self.pb, self.model_name = pb, model_name

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(model_name=self.model_name, requested_output_names=list(self.spec.output_names),
                                      inputs=[to_triton(pb, t.name, feeds[t.name]) for t in self.spec.inputs])
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model {self.model_name!r}: {response.error().message()}")
        return {name: to_numpy(pb.get_output_tensor_by_name(response, name)) for name in self.spec.output_names}

    def describe(self) -> str:
        return f"Triton model {self.model_name} (BLS)"


def _optional(pb: Any, request: Any, name: str) -> Any:
    t = pb.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    a = to_numpy(t).reshape(-1)
    if a.size != 1:
        raise InputError(f"{name}: expected one value, got {a.size}")
    return a[0].item()


def request_arguments(pb: Any, request: Any) -> dict[str, Any]:
    """The orchestrator's inputs as Pipeline.stream arguments (bad values: InputError)."""
    image = pb.get_input_tensor_by_name(request, "image")
    prompt = pb.get_input_tensor_by_name(request, "prompt")
    if image is None or prompt is None:
        raise InputError("expected the inputs 'image' (the image file's bytes) and 'prompt' (the question)")
    try:
        question = to_numpy(prompt).reshape(-1).tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt: expected UTF-8 text ({e})") from e
    granularity = _optional(pb, request, "granularity")
    max_tokens = _optional(pb, request, "max_tokens")
    return {
        "image": to_numpy(image).reshape(-1).tobytes(),
        "question": question,
        "granularity": None if granularity in (None, 0) else int(granularity),
        "max_new_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens),
        "max_visual_tokens": _optional(pb, request, "max_visual_tokens"),
        "temperature": float(_optional(pb, request, "temperature") or 0.0),
        "top_k": _optional(pb, request, "top_k"),
        "top_p": _optional(pb, request, "top_p"),
        "seed": _optional(pb, request, "seed"),
    }


class OrchestratorModel:
    """The decoupled model: one request -> one response per text piece, then a final flag."""

    def __init__(self, pb: Any) -> None:
        self.pb = pb

    def initialize(self, args: dict) -> None:
        from avg_edge.manifest import load_manifest
        from avg_edge.runtime.pipeline import Pipeline

        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"] / _parameter(config, "build_folder")
        m = load_manifest(folder)
        remote = {S.VISION: _parameter(config, "vision_model"), S.ROUTER: _parameter(config, "router_model")}
        bls = {g: BlsBackend(m.spec(g), self.pb, name) for g, name in remote.items() if g in m.graphs}
        self.pipe = Pipeline.load(folder, backend="ort", manifest=m, threads=int(_parameter(config, "threads") or 0),
                                  backends=bls)

    def _send(self, sender: Any, text: str, granularity: int, visual_tokens: int, finish: str, final: bool) -> None:
        pb = self.pb
        tensors = [to_triton(pb, "text", np.frombuffer(text.encode("utf-8"), dtype=np.uint8)),
                   to_triton(pb, "granularity", np.array([granularity], dtype=np.int32)),
                   to_triton(pb, "visual_tokens", np.array([visual_tokens], dtype=np.int32)),
                   to_triton(pb, "finish_reason", np.frombuffer(finish.encode("utf-8"), dtype=np.uint8))]
        sender.send(pb.InferenceResponse(output_tensors=tensors),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def execute(self, requests: list) -> None:
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                gen = self.pipe.stream(**request_arguments(pb, request))
                p = gen.prepared
                for piece in gen:
                    if getattr(sender, "is_cancelled", lambda: False)():
                        gen.close()
                        break
                    self._send(sender, piece, p.granularity, p.visual_tokens, "", final=False)
                r = gen.result
                self._send(sender, "", p.granularity, p.visual_tokens,
                           r.finish_reason if r is not None else "cancelled", final=True)
            except Exception as e:
                sender.send(pb.InferenceResponse(output_tensors=[], error=_error(pb, e)),
                            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self) -> None:
        self.pipe.close()


# -- the client side --------------------------------------------------------------------
_CLIENT_ERRORS = {"usage": InputError, "image": ImageError, "limit": LimitError, "build": BuildFolderError,
                  "busy": Busy, "cancelled": Cancelled}


@dataclass
class TritonAnswer:
    text: str
    pieces: list[str]
    granularity: int
    visual_tokens: int
    finish_reason: str


def ask(url: str, image: bytes, question: str, granularity: int | None = None, max_tokens: int | None = None,
        max_visual_tokens: int | None = None, timeout: float = 120.0) -> TritonAnswer:
    """One streamed request to the repository's avg_edge model over gRPC (needs the
    `triton` extra: tritonclient and grpcio).  A server-side error raises the error table's
    exception for its category (InputError, ImageError, LimitError, ...; else BackendError)."""
    import queue

    import tritonclient.grpc as grpcclient

    def tensor(name: str, a: np.ndarray, dtype: str) -> Any:
        t = grpcclient.InferInput(name, list(a.shape), dtype)
        t.set_data_from_numpy(a)
        return t

    inputs = [tensor("image", np.frombuffer(image, np.uint8), "UINT8"),
              tensor("prompt", np.frombuffer(question.encode("utf-8"), np.uint8), "UINT8")]
    for name, value in (("granularity", granularity), ("max_tokens", max_tokens), ("max_visual_tokens", max_visual_tokens)):
        if value is not None:
            inputs.append(tensor(name, np.array([value], np.int32), "INT32"))
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("avg_edge", inputs, enable_empty_final_response=True)
        pieces, granularity_out, visual, finish = [], 0, 0, ""
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:       # a stream's error carries no status: the category leads the message
                category, _, message = str(error.message()).partition(": ")
                raise _CLIENT_ERRORS.get(category, BackendError)(message or category)
            text = result.as_numpy("text")
            if text is not None:
                pieces.append(text.tobytes().decode("utf-8"))
                granularity_out = int(result.as_numpy("granularity")[0])
                visual = int(result.as_numpy("visual_tokens")[0])
                finish = result.as_numpy("finish_reason").tobytes().decode("utf-8")
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    piece_list = [p for p in pieces if p]
    return TritonAnswer("".join(piece_list).strip(), piece_list, granularity_out, visual, finish)


__all__ = ["GraphModel", "TritonAnswer", "ask", "OrchestratorModel", "BlsBackend", "ORCHESTRATOR_INPUTS", "ORCHESTRATOR_OUTPUTS",
           "request_arguments"]
