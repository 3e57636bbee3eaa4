"""`avg-export realign BUILD_DIR`: RGLF against the deployed decoder itself.

Quantization shifts which granularity the LMM does best with.  For each calibration
sample and granularity, the answer's mean NLL comes from the build's own graphs
(vision graph features, packed, teacher-forced through the build's decoder with
`logit_positions` on the answer); then only the router's weights are trained in
PyTorch (ranking loss + 0.1 CE, margin 1), router.onnx is re-exported, and router
agreement, accuracy and mean visual tokens are reported before and after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from avg_edge import constants as C
from avg_edge.calibration.data import CalibSample, demo_samples, load_samples
from avg_edge.calibration.drift import normalize
from avg_edge.errors import UsageError
from avg_edge.export import specs as S

REPORT_FILE = "realign_report.json"


@dataclass(frozen=True)
class RealignOptions:
    calib_data: Path | None = None
    calib_samples: int = 96
    eval_data: Path | None = None
    eval_samples: int = 120
    epochs: int = 4
    lr: float = 3e-4
    seed: int = 0


@dataclass
class RouterStats:
    agreement: float           # router picks the granularity with the lowest answer NLL (deployed decoder)
    accuracy: float | None     # exact-match accuracy of the answers, when known
    mean_visual_tokens: float


def answer_nll(pipe, sample: CalibSample) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Vision features, prompt embeddings and the answer's mean NLL at each granularity,
    all from the build's own graphs (teacher forcing through the decoder)."""
    from avg_edge.runtime.chat import prompt_ids
    from avg_edge.runtime.image import load_image
    from avg_edge.runtime.packing import gather_indices
    from avg_edge.runtime.preprocess import preprocess_image

    m = pipe.manifest
    before, after = prompt_ids(pipe.tokenizer.encode, m.bos_token_id, sample.question)
    answer = [*pipe.tokenizer.encode(sample.answer), m.eos_token_id]
    pre = preprocess_image(load_image(sample.image), pipe.preprocess_config)
    feats = pipe.backends[S.VISION].infer({"pixel_values": pre.pixel_values.astype(pipe.dtype)})
    table, d = pipe.embed_table, m.hidden_size
    text = np.asarray(table[before + after], dtype=pipe.dtype)
    dec = pipe.backends[S.DECODER]
    nll = []
    for g in m.granularities:
        src = np.concatenate([feats[S.feature_name(g)].reshape(-1, d), pipe.image_newline.reshape(1, d).astype(pipe.dtype)])
        visual = src[gather_indices(g, pre.grid, pre.image_size)]
        prompt = np.concatenate([table[before], visual, table[after]])
        emb = np.concatenate([prompt, table[answer[:-1]]]).astype(pipe.dtype)[None]
        n = emb.shape[1]
        first = prompt.shape[0] - 1                                   # predicts answer[0]
        feeds = {"inputs_embeds": emb, "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None],
                 "logit_positions": np.arange(first, first + len(answer), dtype=np.int64)}
        for t in dec.spec.inputs[4:]:
            feeds[t.name] = np.zeros(dec.spec.shape_of(t, {C.AXIS_PAST: 0}), dtype=t.dtype)
        logits = dec.infer(feeds)["logits"][0].astype(np.float64)    # [len(answer), vocab]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll.append(-float(np.mean(logp[np.arange(len(answer)), answer])))
    return feats, text, np.array(nll)


def router_stats(pipe, samples: list[CalibSample], nlls: list[np.ndarray]) -> RouterStats:
    agree, right, known, tokens = 0, 0, 0, []
    for s, nll in zip(samples, nlls):
        r = pipe.generate(s.image, s.question, max_new_tokens=8)
        agree += r.granularity == pipe.granularities[int(np.argmin(nll))]
        tokens.append(r.visual_tokens)
        if s.answer is not None:
            known += 1
            right += normalize(r.text) == normalize(s.answer)
    return RouterStats(agree / len(samples), 100 * right / known if known else None, float(np.mean(tokens)))


def realign(build_dir: Path, o: RealignOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from avg_edge.export.graphs import RouterGraph, to_precision
    from avg_edge.export.manifest import load_manifest
    from avg_edge.export.onnx_export import export_graph
    from avg_edge.model import load_model
    from avg_edge.model.rglf import rglf_loss
    from avg_edge.runtime.pipeline import Pipeline

    build_dir = Path(build_dir)
    m = load_manifest(build_dir, verify=True)
    if not m.has_router:
        raise UsageError(f"{build_dir}: this build has no router to realign")
    source = Path(m.source.get("model", ""))
    if not (source / C.CONFIG_FILE).is_file():
        raise UsageError(f"{build_dir}: the source checkpoint {source} is gone; realign needs it for the router's weights")
    t0 = time.perf_counter()
    calib = load_samples(o.calib_data, o.calib_samples)
    if any(s.answer is None for s in calib):
        raise UsageError("realign needs answers in the calibration data ({\"image\", \"question\", \"answer\"} per line)")
    evals = load_samples(o.eval_data, o.eval_samples) if o.eval_data else demo_samples(o.eval_samples, split="test")
    pipe = Pipeline.load(build_dir, backend="ort")
    train = [answer_nll(pipe, s) for s in calib]
    eval_nll = [answer_nll(pipe, s)[2] for s in evals if s.answer is not None]
    progress(f"[1/4] answer NLL at every granularity from the build's own decoder: {len(calib)} calibration, "
             f"{len(eval_nll)} evaluation samples ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    before = router_stats(pipe, [s for s in evals if s.answer is not None], eval_nll)
    model = load_model(source)
    router = model.router
    for p in model.parameters():
        p.requires_grad_(False)
    for p in router.parameters():
        p.requires_grad_(True)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(router.parameters(), lr=o.lr, weight_decay=0.0)
    rng = np.random.default_rng(o.seed)
    router.train()
    losses = []
    for _ in range(o.epochs):
        for i in rng.permutation(len(train)):
            feats, text, nll = train[i]
            scaled = {g: torch.from_numpy(np.asarray(feats[S.feature_name(g)], np.float32)) for g in m.granularities}
            logits = router(scaled, torch.from_numpy(np.asarray(text, np.float32)))[None]
            loss = rglf_loss(logits, torch.from_numpy(nll)[None].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    router.eval()
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k]))
    if any(not k.startswith("router.") for k in changed):
        raise AssertionError(f"realign changed non-router weights: {[k for k in changed if not k.startswith('router.')]}")
    progress(f"[2/4] trained the router only ({len(changed)} tensors, {o.epochs} epochs, loss "
             f"{np.mean(losses[:len(train)]):.3f} -> {np.mean(losses[-len(train):]):.3f}) ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    out = build_dir.parent / f".{build_dir.name}.realign-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(build_dir, out)
    try:
        spec = m.spec(S.ROUTER)
        dtype = torch.float16 if spec.inputs[0].dtype == "float16" else torch.float32
        for f in out.glob(spec.file + "*"):
            f.unlink()
        export_graph(RouterGraph(to_precision(model, dtype)), spec, out, m.opset)
        engine = m.engines.get(S.ROUTER)
        if engine:
            (out / engine).unlink()
            m.engines = {k: v for k, v in m.engines.items() if k != S.ROUTER}
        new_pipe = Pipeline.load(out, backend="ort", manifest=m)
        after = router_stats(new_pipe, [s for s in evals if s.answer is not None], eval_nll)
        progress(f"[3/4] re-exported {spec.file} ({time.perf_counter() - t0:.1f} s)")
        report = {"before": dataclasses.asdict(before), "after": dataclasses.asdict(after),
                  "calibration_samples": len(calib), "evaluation_samples": len(eval_nll), "epochs": o.epochs,
                  "changed_tensors": changed,
                  "note": "router engine removed; rebuild engines with avg-export build --backend trt" if engine else ""}
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
        if m.quantization is not None:
            m.quantization["graphs"][S.ROUTER] = {"method": f"{'fp16' if dtype == torch.float16 else 'fp32'} (realigned)"}
        m.realign = report
        m.record_files(out)
        (out / C.MANIFEST_FILE).write_text(m.to_json())
        from avg_edge.export.build import swap_into_place

        swap_into_place(out, build_dir)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    progress(f"[4/4] router agreement {100 * before.agreement:.1f}% -> {100 * after.agreement:.1f}%, "
             + (f"accuracy {before.accuracy:.1f}% -> {after.accuracy:.1f}%, " if before.accuracy is not None else "")
             + f"mean visual tokens {before.mean_visual_tokens:.0f} -> {after.mean_visual_tokens:.0f}")
    return report
