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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge import validation as V
from avg_edge.calibration.data import CalibSample, demo_samples, load_samples
from avg_edge.errors import UsageError
from avg_edge.manifest import BuildCommit, load_manifest
from avg_edge.runtime.pipeline import EncodedImage, Pipeline
from avg_edge.runtime.text import Accuracy

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
    token_cost: float = 0.0    # cost-aware RGLF (model/rglf.py preference); 0 = the paper's


@dataclass
class RouterStats:
    agreement: float           # router picks the granularity with the lowest answer NLL (deployed decoder)
    accuracy: float | None     # exact-match accuracy of the answers, when known
    mean_visual_tokens: float


def answer_nll(pipe: Pipeline, sample: CalibSample) -> tuple[EncodedImage, np.ndarray, np.ndarray]:
    """The encoded image, the prompt embeddings the router reads and the answer's mean NLL
    at each granularity, all from the build's own graphs (Pipeline.score)."""
    enc = pipe.encode_image(sample.image)
    answer = [*pipe.tokenizer.encode(sample.answer), pipe.manifest.eos_token_id]
    nll, text = [], None
    for g in pipe.granularities:
        prepared = pipe.prepare(enc, sample.question, g)
        nll.append(pipe.score(prepared, answer))
        if text is None:
            text = pipe.embed_table[pipe.router_ids(sample.question, prepared.ids_before, prepared.ids_after)]
    return enc, np.asarray(text), np.array(nll)


def router_stats(pipe: Pipeline, samples: list[CalibSample], prefs: list[np.ndarray]) -> RouterStats:
    """prefs: per sample, the values RGLF ranks (NLL, plus the token cost if any)."""
    agree, acc, tokens = 0, Accuracy(), []
    for s, pref in zip(samples, prefs):
        r = pipe.generate(s.image, s.question, max_new_tokens=8)
        agree += r.granularity == pipe.granularities[int(np.argmin(pref))]
        tokens.append(r.visual_tokens)
        if s.answer is not None:
            acc.add(r.text, s.answer)
    return RouterStats(agree / len(samples), acc.percent if acc.total else None, float(np.mean(tokens)))


def realign(build_dir: Path, o: RealignOptions, progress: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from avg_edge.export.graphs import RouterGraph, router_text_table, to_precision
    from avg_edge.export.validate import reference_outputs
    from avg_edge.export.onnx_export import export_graph
    from avg_edge.model import load_model
    from avg_edge.model.rglf import preference, rglf_loss

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
    evals = [s for s in evals if s.answer is not None]
    if not (np.isfinite(o.token_cost) and o.token_cost >= 0):
        raise UsageError(f"--token-cost: expected a number >= 0 (nats per answer token, per the finest granularity's "
                         f"visual tokens), got {o.token_cost}")
    pref = lambda nll: preference(torch.from_numpy(np.asarray(nll, np.float64))[None], m.granularities,  # noqa: E731
                                  o.token_cost)[0].numpy()
    with Pipeline.load(build_dir, backend="ort") as pipe:
        train = [answer_nll(pipe, s) for s in calib]
        eval_nll = [pref(answer_nll(pipe, s)[2]) for s in evals]
        progress(f"[1/4] answer NLL at every granularity from the build's own decoder: {len(calib)} calibration, "
                 f"{len(eval_nll)} evaluation samples ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        before = router_stats(pipe, evals, eval_nll)
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
            enc, text, nll = train[i]
            scaled = {g: torch.from_numpy(np.asarray(enc.features[S.feature_name(g)], np.float32)) for g in m.granularities}
            logits = router(scaled, torch.from_numpy(np.asarray(text, np.float32)))[None]
            loss = rglf_loss(logits, torch.from_numpy(pref(nll))[None].float())
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
    with BuildCommit(build_dir, start_from=build_dir) as commit:
        spec = m.spec(S.ROUTER)
        dtype = torch.float16 if spec.inputs[0].dtype == "float16" else torch.float32
        for f in commit.folder.glob(spec.file + "*"):
            f.unlink()
        model = to_precision(model, dtype)
        # The router's table and its stored reference outputs follow its new weights (both
        # are hard links to the old build's files until replaced here).
        (commit.folder / m.router["text_file"]).unlink(missing_ok=True)
        np.savez(commit.folder / m.router["text_file"], **router_text_table(model))
        points = V.points_from_manifest(m.validation.get(S.ROUTER, {}))
        if points and (commit.folder / C.REFERENCE_FILE).is_file():
            refs = V.load_references(commit.folder / C.REFERENCE_FILE)
            with torch.no_grad():
                refs.update(reference_outputs(RouterGraph(model), spec, points))
            (commit.folder / C.REFERENCE_FILE).unlink()
            V.save_references(commit.folder / C.REFERENCE_FILE, refs)
        export_graph(RouterGraph(model), spec, commit.folder, m.opset)
        engine = m.engines.get(S.ROUTER)
        if engine:
            (commit.folder / engine).unlink()
            m.engines = {k: v for k, v in m.engines.items() if k != S.ROUTER}
        with Pipeline.load(commit.folder, backend="ort", manifest=m) as new_pipe:
            after = router_stats(new_pipe, evals, eval_nll)
        progress(f"[3/4] re-exported {spec.file} ({time.perf_counter() - t0:.1f} s)")
        report = {"before": dataclasses.asdict(before), "after": dataclasses.asdict(after),
                  "calibration_samples": len(calib), "evaluation_samples": len(eval_nll), "epochs": o.epochs,
                  "token_cost": o.token_cost,
                  "changed_tensors": changed,
                  "note": f"router engine removed; rebuild engines with avg-export engines {build_dir}" if engine else ""}
        (commit.folder / REPORT_FILE).unlink(missing_ok=True)     # a hard link to the old build's file
        (commit.folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        if m.quantization is not None:
            m.quantization["graphs"][S.ROUTER] = {"method": f"{'fp16' if dtype == torch.float16 else 'fp32'} (realigned)"}
        m.realign = report
        m.router = {**m.router, "alignment": {"loss": "rglf", "token_cost": o.token_cost, "by": "avg-export realign"}}
        commit.finish(m)
    progress(f"[4/4] router agreement {100 * before.agreement:.1f}% -> {100 * after.agreement:.1f}%, "
             + (f"accuracy {before.accuracy:.1f}% -> {after.accuracy:.1f}%, " if before.accuracy is not None else "")
             + f"mean visual tokens {before.mean_visual_tokens:.0f} -> {after.mean_visual_tokens:.0f}")
    return report
