"""Train the demo AVG-LLaVA on CPU: three stages, resumable, seeded.

    python -m avg_edge.model.demo.train --out runs/demo [--resume]

1. projector, image_newline and decoder, one fresh image per step at a granularity cycled
   from --stage1-granularities (default 144, 144, 576: with ~500 visual tokens instead of
   ~2000 the decoder learns to find the small markers sooner; every marker still has a
   token of its own at 144).  Over the first --curriculum share of the stage some images
   show easier marker layouts (see curriculum_level).  The vision tower keeps
   its designed initialisation (colour/layout patch filters and 2-D sine positions)
   unless --tower-lr is given: trained from scratch at one image per step it stalled
   every question but the background;
2. multi-granularity tuning: loss = mean of the five granularities' losses, tower frozen
   (its outputs are cached per training image);
3. RGLF: router only, a fresh one; per sample the answer NLL at each granularity (plus
   --token-cost x g / 576: cost-aware RGLF, model/rglf.py) ranks them.  After it,
   router_check on the val split fails the run (no checkpoint written) when the router is
   pinned at its LayerNorm bound or its picks do not depend on the question.

--router-only CHECKPOINT runs stage 3 alone on a trained checkpoint (a fresh router;
every other weight is kept bit for bit).

State (model, optimizer, RNG) is saved every --save-every steps as safetensors plus a
progress.json; --resume continues from it.  The final model goes to --checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from avg_edge.model.checkpoint import save_checkpoint
from avg_edge.model.demo.core import answer_nll, demo_config, encode_image, encode_qa, scaled_from_tower
from avg_edge.model.demo.data import sample, training_qas
from avg_edge.model.demo.tokenizer import write_tokenizer
from avg_edge.model.checkpoint import load_model
from avg_edge.model.demo.evaluate import evaluate, router_check
from avg_edge.model.llava import AvgLlavaModel
from avg_edge.model.rglf import preference, rglf_loss
from avg_edge.model.router import GranularityRouter
from avg_edge.runtime.tokenizer import JsonTokenizer

STAGES = ("stage1", "stage2", "stage3")


def sincos_positions(model: AvgLlavaModel, scale: float = 2.0) -> None:
    """Initialise the ViT's learned position embeddings with a 2-D sine/cosine table
    (half the channels for x, half for y; CLS row zero), large enough to be seen next
    to the patch content.  Random 0.02-scale positions left the task's "where" unlearnt."""
    emb = model.vision_tower.clip.embeddings.position_embedding.weight  # [1 + g*g, Dv]
    dim, grid = emb.shape[1] // 2, model.config.vision.grid  # positions use the upper half
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter) / quarter))                     # [Dv/4]
    pos = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")                               # [g, g]
    ax = xx.reshape(-1, 1) * freq                                                  # [g*g, Dv/4]
    ay = yy.reshape(-1, 1) * freq                                                  # [g*g, Dv/4]
    table = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1) * scale     # [g*g, Dv]
    with torch.no_grad():
        emb.zero_()
        emb[1:, dim: dim + table.shape[1]] = table


def colour_patches(model: AvgLlavaModel, scale: float = 1.0) -> None:
    """Initialise the patch embedding so its lower channels read mean colours of the
    patch, its halves, its quadrants and its centre (30 channels); the rest start near
    zero.  Clean colour-and-layout features let the tiny decoder learn from a few thousand
    images.  The centre (the middle 6x6 px) makes a marker's dot a feature of its own:
    without it a black dot and a hole on a dark background gave the same patch means, and
    v3 never learnt the black dot."""
    conv = model.vision_tower.clip.embeddings.patch_embedding                      # [Dv, 3, p, p]
    p = conv.weight.shape[-1]
    h = p // 2
    regions = [(0, p, 0, p), (0, h, 0, p), (h, p, 0, p), (0, p, 0, h), (0, p, h, p),
               (0, h, 0, h), (0, h, h, p), (h, p, 0, h), (h, p, h, p), (h - 3, h + 3, h - 3, h + 3)]
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.01)
        conv.weight[conv.weight.shape[0] // 2:] = 0.0                             # position channels
        for r, (y0, y1, x0, x1) in enumerate(regions):
            for c in range(3):
                conv.weight[3 * r + c] = 0.0
                conv.weight[3 * r + c, c, y0:y1, x0:x1] = scale / ((y1 - y0) * (x1 - x0))


def fresh_router(model: AvgLlavaModel, seed: int = 0) -> None:
    """A new router (the model's own init) with small positive voter weights: the spec's
    zero voter gives every granularity the same vote, and the LayerNorm of equal votes
    has no useful gradient."""
    torch.manual_seed(seed)
    model.router = GranularityRouter(model.config)
    with torch.no_grad():
        L = model.router.voter.shape[0]
        model.router.voter.copy_((1.0 + 0.5 * torch.randn(L, 1)) / L)


def curriculum_level(idx: int, progress: float, until: float) -> int:
    """data.sample's curriculum level for a stage-1 image: over the first `until` of the
    stage, carpets (1, 2) then two-colour clusters (3) mixed with the task (0), so
    reading marker colours is learnt before binding them to the dots; then the task."""
    if progress < 0.3 * until:
        return (1, 2, 0)[idx % 3]
    if progress < 0.7 * until:
        return (2, 3, 0)[idx % 3]
    if progress < until:
        return (3, 0)[idx % 2]
    return 0


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def trainable(model: AvgLlavaModel, stage: str, tower_lr: float = 0.0) -> list[dict]:
    """Optimizer parameter groups of a stage.  Stage 1 trains the vision tower only when
    tower_lr > 0, in its own group at tower_lr x the stage's learning rate."""
    groups: dict[str, list[torch.nn.Parameter]] = {"main": [], "tower": []}
    for name, p in model.named_parameters():
        if stage == "stage3":
            use, group = name.startswith("router."), "main"
        elif name.startswith("vision_tower."):
            use, group = stage == "stage1" and tower_lr > 0, "tower"
        else:
            use, group = not name.startswith("router."), "main"
        p.requires_grad_(use)
        if use:
            groups[group].append(p)
    out = [{"params": groups["main"], "mult": 1.0}]
    if groups["tower"]:
        out.append({"params": groups["tower"], "mult": tower_lr})
    return out


def install_prev_head(model: AvgLlavaModel, constant: float, dim: int = -1) -> list[torch.Tensor]:
    """Run v12d (experiment): decoder layer 0, head 0 attends to the previous token.

    The projector's last output channel becomes a constant (its weight row zeroed, its
    bias `constant` x the mean norm of the other channels on a few training images), and
    the head's query and key read only that channel, with RoPE phases that peak at
    distance 1.  The head's output projection starts at zero.  Returns the frozen
    tensors' (row) masks, applied to their gradients by the caller."""
    from avg_edge.model.demo.core import encode_image
    lin = model.mm_projector[2]
    lm = model.language_model.model
    att, norm = lm.layers[0].self_attn, lm.layers[0].input_layernorm
    hd = model.config.text.head_dim
    half = hd // 2
    with torch.no_grad():
        feats = torch.cat([encode_image(model, sample("train", 100 + i).image)[1].flatten(0, 1) for i in range(2)])
        out = model.mm_projector(feats)                                            # [N, D]
        c = constant * float(out.norm(dim=-1).mean())
        lin.weight[dim] = 0.0
        lin.bias[dim] = c
        out = model.mm_projector(feats)
        xn = norm(out)[:, dim]                                                     # the constant after RMSNorm
        theta = 1.0 / (model.config.text.rope_theta ** (torch.arange(half, dtype=torch.float32) * 2 / hd))
        a = math.sqrt(25.0 * math.sqrt(hd)) / float(xn.mean())                      # score ~25 per frequency pair
        q = torch.cat([torch.cos(-theta), torch.sin(-theta)]) * a
        k = torch.cat([torch.ones(half), torch.zeros(half)]) * a
        att.q_proj.weight[:hd] = 0.0
        att.k_proj.weight[:hd] = 0.0
        att.q_proj.weight[:hd, dim] = q
        att.k_proj.weight[:hd, dim] = k
        att.o_proj.weight[:, :hd] = 0.0
        print(f"prev head: constant {c:.3f}, after RMSNorm {float(xn.mean()):.3f} +- {float(xn.std()):.3f}")
    masks = []
    for t, rows in ((lin.weight, slice(dim, None) if dim == -1 else slice(dim, dim + 1)), (lin.bias, slice(dim, None) if dim == -1 else slice(dim, dim + 1)),
                    (att.q_proj.weight, slice(0, hd)), (att.k_proj.weight, slice(0, hd))):
        m = torch.ones_like(t)
        m[rows] = 0.0
        t.requires_grad_(True)
        t.register_hook(lambda g, m=m: g * m)
        masks.append(m)
    return masks


# -- state files ------------------------------------------------------------------
def save_state(folder: Path, model: AvgLlavaModel, opt: torch.optim.Optimizer, stage: str, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.reshape(-1) if v.dim() == 0 else v
               for i, st in sd["state"].items() for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "progress.json").write_text(json.dumps({"stage": stage, "step": step, "param_groups": sd["param_groups"]}))


def load_state(folder: Path, model: AvgLlavaModel, opt: torch.optim.Optimizer) -> None:
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    flat = load_file(str(folder / "optimizer.safetensors"))
    torch.set_rng_state(flat.pop("rng.torch"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v.reshape(()) if k == "step" else v
    groups = json.loads((folder / "progress.json").read_text())["param_groups"]
    opt.load_state_dict({"state": state, "param_groups": groups})


# -- one step per stage -----------------------------------------------------------------
class Trainer:
    def __init__(self, args: argparse.Namespace, model: AvgLlavaModel, tok: JsonTokenizer) -> None:
        self.args, self.model, self.tok = args, model, tok
        self.tower: dict[int, tuple] = {}   # image index -> (preprocessed, tower features)
        self.nll: dict[int, torch.Tensor] = {}  # image index -> [questions, G] (stage 3)
        self.progress = 0.0                     # share of the current stage done
        self.log_file = open(Path(args.out) / "log.jsonl", "a")

    def log(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def prompts(self, s):
        return [encode_qa(self.tok, self.model.config, qa) for qa in training_qas(s)]

    def cached(self, idx: int):
        if idx not in self.tower:
            with torch.no_grad():
                self.tower[idx] = encode_image(self.model, sample("train", idx).image)
        return self.tower[idx]

    def stage1(self, idx: int) -> torch.Tensor:
        s = sample("train", idx, curriculum_level(idx, self.progress, self.args.curriculum))
        with torch.set_grad_enabled(self.args.tower_lr > 0):
            pre, feats = encode_image(self.model, s.image)                   # [crops, 576, Dv]
        gs = self.args.stage1_granularities
        g = gs[idx % len(gs)]  # few-token granularities teach the decoder where to look, cheaply
        if g == 576:
            scaled = {576: self.model.mm_projector(feats)}                    # {576: [crops, 576, D]}
        else:
            scaled = scaled_from_tower(self.model, feats)                     # {g: [crops, g, D]}
        return answer_nll(self.model, scaled, g, pre, self.prompts(s)).mean()

    def stage2(self, idx: int) -> torch.Tensor:
        pre, feats = self.cached(idx)
        scaled = scaled_from_tower(self.model, feats)                         # {g: [crops, g, D]}
        ps = self.prompts(sample("train", idx))
        losses = [answer_nll(self.model, scaled, g, pre, ps).mean() for g in self.model.config.granularities]
        return torch.stack(losses).mean()

    def stage3(self, idx: int) -> torch.Tensor:
        m = self.model
        pre, feats = self.cached(idx)
        ps = self.prompts(sample("train", idx))
        with torch.no_grad():
            scaled = scaled_from_tower(m, feats)
            if idx not in self.nll:
                self.nll[idx] = torch.stack([answer_nll(m, scaled, g, pre, ps) for g in m.config.granularities], 1)
            text = [m.router_text(p.before, p.after, p.question) for p in ps]         # [T, D] each
        logits = m.router.forward_many(scaled, text)                              # [Q, G]
        return rglf_loss(logits, preference(self.nll[idx], m.config.granularities, self.args.token_cost), margin=1.0)


def run_stage(tr: Trainer, stage: str, steps: int, pool: int, lr: float, start: int, opt, bar: Progress) -> None:
    args, model = tr.args, tr.model
    n = steps * args.accum if stage == "stage1" else pool  # stage 1 sees fresh images; 2 and 3 cycle a cached pool
    order = np.random.default_rng([7, STAGES.index(stage)]).permutation(n)
    step_fn = getattr(tr, stage)
    task = bar.add_task(stage, total=steps, completed=start, loss=float("nan"))
    ema = None
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr) * group["mult"]
        idx = int(order[step % n])
        tr.progress = step / steps
        opt.zero_grad(set_to_none=True)
        accum = args.accum if stage == "stage1" else 1
        total = 0.0
        for k in range(accum):  # stage 1: several fresh images per step
            loss = step_fn(int(order[(step * accum + k) % n]) if stage == "stage1" else idx) / accum
            loss.backward()
            total += float(loss.detach())
        loss = torch.tensor(total)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(task, advance=1, loss=ema)
        if (step + 1) % 100 == 0:
            tr.log({"stage": stage, "step": step + 1, "loss_ema": round(ema, 4), "lr": opt.param_groups[0]["lr"]})
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            save_state(Path(args.out) / "state", model, opt, stage, step + 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder (state, logs)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--checkpoint", default=str(Path(__file__).parent / "checkpoint"), help="final model folder")
    ap.add_argument("--steps", type=int, nargs=3, default=[6000, 600, 1000], metavar=("S1", "S2", "S3"))
    ap.add_argument("--pool", type=int, nargs=2, default=[300, 150], metavar=("P2", "P3"),
                    help="train images cycled in stages 2 and 3 (tower outputs cached)")
    ap.add_argument("--lr", type=float, nargs=3, default=[1e-3, 5e-4, 1e-3])
    ap.add_argument("--tower-lr", type=float, default=0.0, metavar="MULT",
                    help="train the vision tower in stage 1 at MULT x the learning rate (default 0: it keeps its "
                         "designed initialisation; trained from scratch at batch 1 it stalled every question but "
                         "the background)")
    ap.add_argument("--stage1-granularities", type=int, nargs="+", default=[144, 144, 576], metavar="G",
                    help="granularities cycled over stage-1 images (mostly 144: fewer visual tokens, and every "
                         "marker keeps a token of its own)")
    ap.add_argument("--curriculum", type=float, default=0.5, metavar="SHARE",
                    help="share of stage 1 that also shows easier marker layouts (see curriculum_level)")
    ap.add_argument("--accum", type=int, default=1, help="images per stage-1 step")
    ap.add_argument("--router-only", metavar="CHECKPOINT", default=None,
                    help="run stage 3 alone, with a fresh router, on this trained checkpoint")
    ap.add_argument("--init-from", metavar="CHECKPOINT", default=None,
                    help="start every stage from a trained checkpoint's weights instead of a fresh model")
    ap.add_argument("--prev-head", type=float, default=0.0, metavar="C",
                    help="experiment v12d: a fixed previous-token head in decoder layer 0 (C: the constant channel's scale)")
    ap.add_argument("--router-text", choices=("prompt", "question"), default="question",
                    help="the router filter's candidates (config router_text_candidates): the whole prompt (the "
                         "spec) or the question's own tokens (default: the 32-token system prompt otherwise fills k)")
    ap.add_argument("--token-cost", type=float, default=0.0, metavar="LAMBDA",
                    help="cost-aware RGLF: rank by answer NLL + LAMBDA x g / 576 (0: the paper's RGLF)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the model's initialisation and training")
    ap.add_argument("--decoder-layers", type=int, default=2, help="the language model's layers")
    ap.add_argument("--router-seed", type=int, default=0)
    ap.add_argument("--check-images", type=int, default=20, help="val images of the router check after stage 3")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--val", type=int, default=20, help="validation images checked after each stage")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = JsonTokenizer(write_tokenizer(out / "tokenizer.json"))
    torch.manual_seed(args.seed)
    if args.init_from:
        shutil.copyfile(Path(args.init_from) / "tokenizer.json", out / "tokenizer.json")
        tok = JsonTokenizer(out / "tokenizer.json")
        model = load_model(args.init_from)
    elif args.router_only:
        shutil.copyfile(Path(args.router_only) / "tokenizer.json", out / "tokenizer.json")
        tok = JsonTokenizer(out / "tokenizer.json")
        model = load_model(args.router_only)
    else:
        model = AvgLlavaModel(demo_config(tok.vocab_size, args.decoder_layers), tok)
        sincos_positions(model)
        colour_patches(model)
    if args.prev_head:
        install_prev_head(model, args.prev_head)
    model.config = model.config.replace(router_text_candidates=args.router_text, router_token_cost=args.token_cost)
    fresh_router(model, args.router_seed)
    progress = json.loads((out / "state" / "progress.json").read_text()) if args.resume and (out / "state" / "progress.json").exists() else None
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(), TimeRemainingColumn())
    tr = Trainer(args, model, tok)
    for si, stage in enumerate(STAGES):
        if args.router_only and stage != "stage3":
            continue
        steps = args.steps[si]
        start = 0
        params = trainable(model, stage, args.tower_lr)
        opt = torch.optim.AdamW(params, lr=args.lr[si], weight_decay=0.0)
        if progress is not None:
            done = STAGES.index(progress["stage"])
            if si < done or (si == done and progress["step"] >= steps):
                if si == done:  # stage finished: only its weights are needed
                    model.load_state_dict(load_file(str(out / "state" / "model.safetensors")))
                continue
            if si == done:
                load_state(out / "state", model, opt)
                start = progress["step"]
        model.train()
        pool = args.pool[0] if stage == "stage2" else args.pool[1]
        with Progress(*cols) as bar:
            run_stage(tr, stage, steps, pool, args.lr[si], start, opt, bar)
        model.eval()
        acc = evaluate(model, tok, "val", args.val)
        tr.log({"stage": stage, "val": acc})
        print(stage, "val accuracy:", json.dumps(acc))
        if stage == "stage2":
            tr.tower = {k: v for k, v in tr.tower.items() if k < args.pool[1]}  # keep what stage 3 uses
    check = router_check(model, tok, "val", args.check_images)
    tr.log({"router_check": {"picks": {k: {str(g): v for g, v in p.items()} for k, p in check.picks.items()},
                             "at_bound": check.at_bound, "max_ratio": check.max_ratio}})
    print("router picks on val:", json.dumps({k: {str(g): round(v, 2) for g, v in p.items()} for k, p in check.picks.items()}))
    if check.problems():
        raise SystemExit("stage 3 failed its check, no checkpoint written:\n- " + "\n- ".join(check.problems()))
    final = Path(args.checkpoint)
    if final.exists():
        shutil.rmtree(final)
    save_checkpoint(model, final, tokenizer_files=(out / "tokenizer.json",))
    print("wrote", final)


if __name__ == "__main__":
    main()
