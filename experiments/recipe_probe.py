"""The recipe probe of RESULTS.md: a single-file training + clean-instruction evaluation of the embedded MiniLM,
outside the pipeline, to compare attention masks, readouts, LoRA targets, learning rates and data sizes fast.

It is a prototype, not the pipeline: one sequence per training row (the original prompt; --both adds the
paraphrase), plain SFT loss (optionally a first-token weight or a label-word softmax), hand-built 4D masks,
per-label loglik scoring on the clean CoIN instructions. The findings it produced were then rebuilt in the
package (model.attention, model.readout, ...) and measured again through `coin` itself (RESULTS.md).

    ./run.sh python experiments/recipe_probe.py --tasks sst2 --rows 800 --steps 50 --readout mean --bf16
"""
import argparse
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from batch_calibration import batch_calibrated  # experiments/, beside this script
from peft import LoraConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

from coin.config import PairsSettings, load_settings
from coin.data.pairs import build_pairs
from coin.data.prompts import encode, format_prompt
from coin.data.tasks import get_task
from coin.data.templates import load_templates, render
from coin.evaluation.instructions import load_instruction_sets
from coin.evaluation.sampling import sample_examples
from coin.evaluation.scoring import calibrated, label_log_prior
from coin.modeling.backbone import load_backbone, set_backbone_dropout, split_body_head
from coin.predict import join_instruction

ap = argparse.ArgumentParser()
ap.add_argument("--attn", default="prefix",
                help="prefix | causal | segment: prefix, but each input field's tokens attend only within that field "
                     "(the sentence embedding MiniLM was trained to produce); the other prompt tokens see the whole "
                     "prompt, the response the whole prompt causally")
ap.add_argument("--rows", default="400",
                help="GLUE train rows per task: a number, or 'params' (the shipped params.yaml's pairs.rows_per_task)")
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--bs", type=int, default=16)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--targets", default="query,value")
ap.add_argument("--r", type=int, default=16)
ap.add_argument("--full", action="store_true")
ap.add_argument("--tasks", default="sst2,cola,mrpc,qnli,rte,wnli,mnli")
ap.add_argument("--neval", type=int, default=100)
ap.add_argument("--eval_every", type=int, default=0)
ap.add_argument("--bf16", action="store_true")
ap.add_argument("--both", action="store_true", help="train on paraphrase prompts too")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--balance", action="store_true")
ap.add_argument("--dropout", type=float, default=None,
                help="backbone and LoRA dropout while training (the shipped recipe: 0); default: the checkpoint's "
                     "0.1 and LoRA's 0.05")
ap.add_argument("--first_weight", type=float, default=1.0)
ap.add_argument("--label_ce", type=float, default=0.0)
ap.add_argument("--flan_eval", action="store_true")
ap.add_argument("--answers", default="label_words")
ap.add_argument("--layers", default="")
ap.add_argument("--readout", default="last",
                help="last | mean | pair: the mean readout plus a learned projection (zero at start) of "
                     "[u, v, |u - v|, u * v], u and v the mean states of the two input fields (v = u for one field)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
DATA = str(Path(__file__).resolve().parents[1] / "data")
tasks = args.tasks.split(",")

bb = load_backbone("minilm", seed=args.seed)
tok = bb.tokenizer
model = bb.model
set_backbone_dropout(model, args.dropout)
if not args.full:
    cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05 if args.dropout is None else args.dropout,
                     target_modules=args.targets.split(","),
                     modules_to_save=["cls.predictions.transform"], task_type="CAUSAL_LM",
                     layers_to_transform=[int(x) for x in args.layers.split(",")] if args.layers else None)
    model = get_peft_model(model, cfg)
body, head = split_body_head(model)
print("trainable", sum(p.numel() for p in model.parameters() if p.requires_grad), flush=True)

def seg_tensor(segs, T):
    """(B, T) field index per token from the per-row lists of segments(); 0 past each list."""
    sg = torch.zeros(len(segs), T, dtype=torch.long)
    for i, s_ in enumerate(segs):
        sg[i, :len(s_)] = torch.tensor(s_)
    return sg

def mask4d(lengths, prompt_lens, T, attn, segs=None):
    pos = torch.arange(T)
    real = pos[None, :] < torch.tensor(lengths)[:, None]          # (N,T)
    prm = pos[None, :] < torch.tensor(prompt_lens)[:, None]        # (N,T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[None] & real[:, None, :]
    if attn in ("prefix", "segment"):
        both = prm[:, :, None] & prm[:, None, :]
        if attn == "segment":
            sg = seg_tensor(segs, T)
            # a field token (segment > 0) sees only its own field; the other prompt tokens see all the prompt
            same = (sg[:, :, None] == sg[:, None, :]) | (sg[:, :, None] == 0)
            allowed = (allowed & ~prm[:, :, None]) | (both & same)
        else:
            allowed = allowed | both
    allowed = allowed | torch.eye(T, dtype=torch.bool)[None]
    return allowed[:, None]

def forward_hidden(ids_list, plen_list, segs=None):
    T = max(map(len, ids_list))
    ids = torch.full((len(ids_list), T), tok.pad_token_id)
    for i, s in enumerate(ids_list):
        ids[i, :len(s)] = torch.tensor(s)
    m = mask4d([len(s) for s in ids_list], plen_list, T, args.attn, segs)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        return body(input_ids=ids, attention_mask=m, use_cache=False).last_hidden_state

def mean_readout(h, plens):
    T = h.shape[1]
    pos = torch.arange(T)
    pm = (pos[None, :] < torch.tensor(plens)[:, None]).to(h.dtype)          # (B,T)
    mean = (h * pm[..., None]).sum(1) / pm.sum(1, keepdim=True)              # (B,H)
    idx = torch.tensor(plens) - 1
    out = h.clone()
    out[torch.arange(h.shape[0]), idx] = mean
    return out

def pair_readout(h, plens, segs):
    """mean_readout, plus PAIR_PROJ([u, v, |u - v|, u * v]) at the last prompt position."""
    B, T, _ = h.shape
    sg = seg_tensor(segs, T)
    pm = (torch.arange(T)[None, :] < torch.tensor(plens)[:, None]).to(h.dtype)
    idx = torch.tensor(plens) - 1
    out = mean_readout(h, plens)   # the prompt mean at idx
    mean = out[torch.arange(B), idx]

    def field_mean(i):
        m = (sg == i).to(h.dtype) * pm
        n = m.sum(1, keepdim=True)
        return torch.where(n > 0, (h * m[..., None]).sum(1) / n.clamp(min=1), mean)

    u = field_mean(1)
    v = torch.where(((sg == 2).sum(1) > 0)[:, None], field_mean(2), u)
    feat = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
    out[torch.arange(B), idx] = mean + PAIR_PROJ(feat).to(h.dtype)
    return out

def segments(prompt, fields):
    """Per prompt token of ``encode(tok, prompt, ...)``: 0 for BOS/instruction/marker, i + 1 inside field i."""
    text = format_prompt(prompt)
    enc_ = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for f in fields:  # in any order: some FLAN templates name the second field first
        k = text.find(f)
        while k >= 0 and any(x < k + len(f) and k < y for x, y in spans):
            k = text.find(f, k + 1)
        if k < 0:
            SEG_MISSES[0] += 1
            spans.append((-1, -1))
            continue
        spans.append((k, k + len(f)))
    seg = []
    for a, b in enc_["offset_mapping"]:
        s_ = 0
        for i, (x, y) in enumerate(spans):
            if x <= a and b <= y and b > a:
                s_ = i + 1
        seg.append(s_)
    bos = [0] if tok.bos_token_id is not None else []
    return bos + seg

SEG_MISSES = [0]
NEED_SEG = args.attn == "segment" or args.readout == "pair"
_rng = torch.get_rng_state()  # the projection's default init draws numbers: keep the other runs' stream unchanged
PAIR_PROJ = torch.nn.Linear(4 * model.config.hidden_size, model.config.hidden_size)
torch.set_rng_state(_rng)
torch.nn.init.zeros_(PAIR_PROJ.weight)
torch.nn.init.zeros_(PAIR_PROJ.bias)
if args.readout != "pair":
    PAIR_PROJ.requires_grad_(False)

ROWS = load_settings(Path(DATA).parent / "params.yaml").pairs.rows_per_task if args.rows == "params" else int(args.rows)
rows = build_pairs(DATA, PairsSettings(tasks=tasks, rows_per_task=ROWS, val_fraction=0.0,
                                       answers=args.answers), 42)
train_items = []
for r in rows:
    fields = [str(r["inputs"][f]) for f in get_task(r["task"]).fields]
    train_items.append((r["original_prompt"], r["target"], r["task"], r["answer_words"], fields))
    if args.both:
        train_items.append((r["paraphrase_prompt"], r["target"], r["task"], r["answer_words"], fields))
print("train items", len(train_items), flush=True)
LABEL_COUNTS = {t: [0] * get_task(t).num_labels for t in tasks}
for r in rows:
    LABEL_COUNTS[r["task"]][int(r["label"])] += 1
enc = []
for p, t, _, words, fields in train_items:
    e = encode(tok, p, t, append_eos=True, max_length=256)
    firsts = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    seg = segments(p, fields) if NEED_SEG else None
    if seg is not None and len(seg) != e.n_prompt:
        seg = seg[-e.n_prompt:] if len(seg) > e.n_prompt else None
    enc.append((e.input_ids, e.n_prompt, firsts, seg))

# eval set
instr = load_instruction_sets(f"{DATA}/promptbench/coin_perturbed_instructions.json", ["clean"], tasks)
evals = {}
for t in tasks:
    spec = get_task(t)
    ex, _ = sample_examples(DATA, t, args.neval, 42)
    prompts, labels = [], []
    for ins in instr["clean"][t]:
        for row in ex:
            prompts.append((join_instruction(ins, spec.render_content(row)), [str(row[f]) for f in spec.fields]))
            labels.append(int(row["label"]))
    # content-free calibration (the package's evaluate.calibration: content_free): each label's score minus its
    # score after the same instruction with an empty input, plus the log label share of the training rows
    cf = [(join_instruction(ins, ""), []) for ins in instr["clean"][t]]
    evals[t] = (prompts + cf, labels, list(spec.label_words))

flan_evals = {}
if args.flan_eval:
    for t in tasks:
        spec = get_task(t)
        tt = load_templates(DATA, spec)
        ex, _ = sample_examples(DATA, t, args.neval, 42)
        words = list(spec.label_words) if args.answers == "label_words" else list(tt.flan_options)
        prompts, labels = [], []
        for tpl in [x for x in tt.classification()][:6]:
            for row in ex:
                p, _ = render(tpl, tt, row, tuple(words))
                prompts.append((p, [str(row[f]) for f in spec.fields]))
                labels.append(int(row["label"]))
        flan_evals[t] = (prompts, labels, words)

def evaluate():
    run_eval(evals, "clean")
    if flan_evals:
        run_eval(flan_evals, "flan")

def run_eval(evals, name):
    model.eval()
    out = {}
    with torch.inference_mode():
        for t, (prompts, labels, words) in evals.items():
            seqs, plens, meta, segl = [], [], [], []
            for i, (p, fields) in enumerate(prompts):
                seg = segments(p, fields) if NEED_SEG else None
                for j, w in enumerate(words):
                    e = encode(tok, p, w, append_eos=False, max_length=256)
                    seqs.append(e.input_ids)
                    plens.append(e.n_prompt)
                    meta.append((i, j))
                    segl.append(seg[-e.n_prompt:] if seg is not None else None)
            scores = torch.zeros(len(prompts), len(words))
            order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k]))
            for s in range(0, len(order), 64):
                idx = order[s:s + 64]
                h = forward_hidden([seqs[k] for k in idx], [plens[k] for k in idx],
                                   [segl[k] for k in idx] if args.attn == "segment" else None)
                if args.readout == "mean":
                    h = mean_readout(h, [plens[k] for k in idx])
                elif args.readout == "pair":
                    h = pair_readout(h, [plens[k] for k in idx], [segl[k] for k in idx])
                rr, cc, tt, dd = [], [], [], []
                for b, k in enumerate(idx):
                    for q in range(plens[k], len(seqs[k])):
                        rr.append(b)
                        cc.append(q - 1)
                        tt.append(seqs[k][q])
                        dd.append(k)
                lp = torch.log_softmax(head(h[rr, cc]).float(), -1).gather(1, torch.tensor(tt)[:, None])[:, 0]
                flat = torch.zeros(len(seqs)).index_add_(0, torch.tensor(dd), lp)
                for k in idx:
                    i, j = meta[k]
                    scores[i, j] = flat[k]
            lab = torch.tensor(labels)
            n_cf = len(prompts) - len(labels)
            cal = {}  # calibrated decisions, by name (none for evaluations without content-free prompts)
            if n_cf:  # the content-free prompts close the list, one per instruction (instruction-major order)
                scores, cf = scores[:len(labels)], scores[len(labels):]
                prior = label_log_prior(LABEL_COUNTS[t])
                per_ins = len(labels) // n_cf
                cal["content-free calibrated"] = calibrated(scores, cf.repeat_interleave(per_ins, 0), prior)
                # batch calibration (Zhou et al. 2024), with the same training-label prior
                groups = [range(i * per_ins, (i + 1) * per_ins) for i in range(n_cf)]
                cal["batch calibrated"] = batch_calibrated(scores, groups) + prior
                cal["+ label prior only"] = torch.log_softmax(scores, 1) + prior
            cal = {k: (v.argmax(1) == lab).float().mean().item() * 100 for k, v in cal.items()}
            pred = scores.argmax(1)
            acc = (pred == lab).float().mean().item() * 100
            maj = max((lab == c).float().mean().item() for c in range(len(words))) * 100
            share = [(pred == c).float().mean().item() for c in range(len(words))]
            out[t] = (acc, maj, share, cal)
    model.train()
    s = " ".join(f"{t}={a:.1f}/{m:.0f}" for t, (a, m, _, _) in out.items())
    ma = sum(a for a, _, _, _ in out.values()) / len(out)
    mm = sum(m for _, m, _, _ in out.values()) / len(out)
    print(f"  eval[{name}]: {s} | mean {ma:.1f} vs maj {mm:.1f} ({ma-mm:+.1f})", flush=True)
    for how in next(iter(out.values()))[3]:
        accs = {t: c[how] for t, (*_, c) in out.items()}
        s = " ".join(f"{t}={a:.1f}" for t, a in accs.items())
        mc = sum(accs.values()) / len(accs)
        print(f"  eval[{name}, {how}]: {s} | mean {mc:.1f} vs maj {mm:.1f} ({mc-mm:+.1f})", flush=True)
    print("   pred shares:", {t: [round(x, 2) for x in sh] for t, (_, _, sh, _) in out.items()}, flush=True)
    return out

params = [p for p in model.parameters() if p.requires_grad] + list(PAIR_PROJ.parameters())
opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
sched = get_linear_schedule_with_warmup(opt, int(0.06 * args.steps), args.steps)
rng = random.Random(args.seed)
order = list(range(len(enc)))
rng.shuffle(order)
ptr = 0
t0 = time.time()
model.train()
for step in range(1, args.steps + 1):
    if ptr + args.bs > len(order):
        rng.shuffle(order)
        ptr = 0
    idx = order[ptr:ptr + args.bs]
    ptr += args.bs
    ids = [enc[k][0] for k in idx]
    pl = [enc[k][1] for k in idx]
    segs = [enc[k][3] or [0] * enc[k][1] for k in idx] if NEED_SEG else None
    h = forward_hidden(ids, pl, segs if args.attn == "segment" else None)
    if args.readout == "mean":
        h = mean_readout(h, pl)
    elif args.readout == "pair":
        h = pair_readout(h, pl, segs)
    rr, cc, tt, ww = [], [], [], []
    for b, k in enumerate(idx):
        s, n = enc[k][0], enc[k][1]
        for q in range(n, len(s)):
            rr.append(b)
            cc.append(q - 1)
            tt.append(s[q])
            ww.append(args.first_weight if q == n else 1.0)
    logits = head(h[rr, cc]).float()
    ww = torch.tensor(ww)
    loss = (F.cross_entropy(logits, torch.tensor(tt), reduction="none") * ww).sum() / ww.sum()
    if args.label_ce:
        fl = []
        for b, k in enumerate(idx):
            s, n, firsts = enc[k][:3]
            lg = head(h[b, n - 1]).float()[firsts]
            fl.append(F.cross_entropy(lg[None], torch.tensor([firsts.index(s[n])])))
        loss = loss + args.label_ce * torch.stack(fl).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f} {time.time()-t0:.0f}s", flush=True)
    if args.eval_every and step % args.eval_every == 0 and step < args.steps:
        evaluate()
print(f"segment misses {SEG_MISSES[0]}", flush=True)
print(f"train time {time.time()-t0:.0f}s epochs {args.steps*args.bs/len(enc):.2f}", flush=True)
t1 = time.time()
evaluate()
print(f"eval time {time.time()-t1:.0f}s", flush=True)
