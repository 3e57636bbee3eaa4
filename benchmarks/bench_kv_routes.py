"""One decoder attention step at the real width (32 heads x 128, fp32, a 4096-row cache), on
ONNX Runtime CPU, by three cache routes, at past 100, 1000 and 3000:

  concat                 Concat(past, new) -> Attention   (a fresh present every step)
  scatter + attention    opset-24 TensorScatter + Attention(nonpad_kv_seqlen), present bound
                         to the past buffer
  gqa                    com.microsoft.GroupQueryAttention, present bound to the past buffer

    python benchmarks/bench_kv_routes.py [THREADS]

This is what chose the in-place cache's operator (README: --kv-cache).  Median of 30 runs.
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import helper, TensorProto as T

H, HD, CAP = 32, 128, 4096
D = H * HD
F = T.FLOAT


def sess(model, name):
    so = ort.SessionOptions(); so.log_severity_level = 3
    if len(sys.argv) > 1: so.intra_op_num_threads = int(sys.argv[1])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def concat_model():
    # q,k,v [1,H,1,HD]; past [1,H,P,HD] -> present = concat; out = softmax(q k^T) v
    i = [helper.make_tensor_value_info(n, F, s) for n, s in (("q", [1, H, 1, HD]), ("k", [1, H, 1, HD]), ("v", [1, H, 1, HD]),
                                                              ("pk", [1, H, "P", HD]), ("pv", [1, H, "P", HD]))]
    o = [helper.make_tensor_value_info(n, F, None) for n in ("y", "ok", "ov")]
    nodes = [helper.make_node("Concat", ["pk", "k"], ["ok"], axis=2), helper.make_node("Concat", ["pv", "v"], ["ov"], axis=2),
             helper.make_node("Attention", ["q", "ok", "ov"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "c", i, o), opset_imports=[helper.make_opsetid("", 24)])


def scatter_model():
    i = [helper.make_tensor_value_info(n, F, s) for n, s in (("q", [1, H, 1, HD]), ("k", [1, H, 1, HD]), ("v", [1, H, 1, HD]),
                                                              ("ck", [1, H, CAP, HD]), ("cv", [1, H, CAP, HD]))]
    i.append(helper.make_tensor_value_info("wi", T.INT64, [1]))
    i.append(helper.make_tensor_value_info("nk", T.INT64, [1]))
    o = [helper.make_tensor_value_info(n, F, None) for n in ("y", "ok", "ov")]
    nodes = [helper.make_node("TensorScatter", ["ck", "k", "wi"], ["ok"], axis=2),
             helper.make_node("TensorScatter", ["cv", "v", "wi"], ["ov"], axis=2),
             helper.make_node("Attention", ["q", "ok", "ov", "", "", "", "nk"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "s", i, o), opset_imports=[helper.make_opsetid("", 24)])


def gqa_model():
    i = [helper.make_tensor_value_info(n, F, s) for n, s in (("q", [1, 1, D]), ("k", [1, 1, D]), ("v", [1, 1, D]),
                                                              ("ck", [1, H, CAP, HD]), ("cv", [1, H, CAP, HD]))]
    i.append(helper.make_tensor_value_info("sk", T.INT32, [1]))
    i.append(helper.make_tensor_value_info("tl", T.INT32, []))
    o = [helper.make_tensor_value_info(n, F, None) for n in ("y", "ok", "ov")]
    nodes = [helper.make_node("GroupQueryAttention", ["q", "k", "v", "ck", "cv", "sk", "tl"], ["y", "ok", "ov"],
                              domain="com.microsoft", num_heads=H, kv_num_heads=H)]
    return helper.make_model(helper.make_graph(nodes, "g", i, o), opset_imports=[helper.make_opsetid("", 21),
                                                                              helper.make_opsetid("com.microsoft", 1)])


def timed(fn, n=30):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1000


rng = np.random.default_rng(0)
print("| past | concat | scatter + attention | gqa (in place) |\n|---|---|---|---|")
q4 = rng.standard_normal((1, H, 1, HD)).astype(np.float32)
for past in (100, 1000, 3000):
    s = sess(concat_model(), "c")
    pk = rng.standard_normal((1, H, past, HD)).astype(np.float32)
    ms_c = timed(lambda: s.run(None, {"q": q4, "k": q4, "v": q4, "pk": pk, "pv": pk}))
    # scatter, present bound to the past buffer
    s2 = sess(scatter_model(), "s")
    ck = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, H, CAP, HD)).astype(np.float32))
    cv = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, H, CAP, HD)).astype(np.float32))
    b = s2.io_binding()
    for n, v in (("q", q4), ("k", q4), ("v", q4), ("wi", np.array([past])), ("nk", np.array([past + 1]))):
        b.bind_cpu_input(n, v)
    b.bind_ortvalue_input("ck", ck); b.bind_ortvalue_input("cv", cv)
    b.bind_ortvalue_output("ok", ck); b.bind_ortvalue_output("ov", cv); b.bind_output("y", "cpu")
    ms_s = timed(lambda: s2.run_with_iobinding(b))
    s3 = sess(gqa_model(), "g")
    gk = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, H, CAP, HD)).astype(np.float32))
    gv = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, H, CAP, HD)).astype(np.float32))
    b3 = s3.io_binding()
    q3 = rng.standard_normal((1, 1, D)).astype(np.float32)
    for n, v in (("q", q3), ("k", q3), ("v", q3), ("sk", np.array([past], np.int32)), ("tl", np.array(past + 1, np.int32))):
        b3.bind_cpu_input(n, v)
    b3.bind_ortvalue_input("ck", gk); b3.bind_ortvalue_input("cv", gv)
    b3.bind_ortvalue_output("ok", gk); b3.bind_ortvalue_output("ov", gv); b3.bind_output("y", "cpu")
    ms_g = timed(lambda: s3.run_with_iobinding(b3))
    print(f"| {past} | {ms_c:.3f} ms | {ms_s:.3f} ms | {ms_g:.3f} ms |")
