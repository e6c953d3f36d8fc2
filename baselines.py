"""The methods FRISM is compared with, on the same streamed task vectors, as one table (METHODS).

For every merged linear weight (the seven projections of each decoder layer that frism.py
merges), with tau_vlm = W_vlm - W_base and tau_lrm = W_lrm - W_base in fp32, the result cast
once to the model's dtype; every other tensor stays the VLM's, bit for bit:

  ta         Task Arithmetic     W = W_vlm + lam * tau_lrm                (= frism.py --no-train)
  ties       TIES-Merging        W = W_base + disjoint_mean(trim(tau_vlm), lam * trim(tau_lrm))
  dare       DARE                W = W_vlm + lam * mask * tau_lrm / density
  ip         IP-Merging          W = W_vlm + lam * s * tau_lrm_k P   (layers that pass a threshold)
  selective  Selective rank-k    W = W_vlm + lam * tau_k * ||tau||_F / ||tau_k||_F
  star       STAR                W = W_vlm + lam * U_r diag(S_r * sum(S) / sum(S_r)) Vh_r
  tsv        TSV-Merge           W = W_base + alpha * polar(U) diag(S) polar(Vh)  (both task vectors)

    python baselines.py ties --vlm Qwen/Qwen2.5-VL-7B-Instruct \\
        --lrm deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --base Qwen/Qwen2.5-Math-7B --out ties-7b

A new method is one function and one row of METHODS: its rule, its flags with their defaults.
The input checks, the streamed reading, the atomic save and the model card are frism.py's. The
output is an ordinary checkpoint of the VLM's class plus baselines_report.json and README.md.
"""
import argparse
import math
import sys
import time
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

import frism


# ----------------------------------------------------------------------------------------------
# TIES-Merging (Yadav et al., NeurIPS 2023), as applied to a VLM and a reasoning LLM by Chen et
# al., "Bring Reason to Vision" (2025): trim, elect a sign, disjoint mean.
# ----------------------------------------------------------------------------------------------

def trim(tau, density):
    """Keep the k = density x numel largest magnitudes of one tensor, zero the rest."""
    k = max(1, round(density * tau.numel()))
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().flatten().topk(k, sorted=False).indices] = True
    return tau * keep.view_as(tau)


def ties(W_base, tau_vlm, tau_lrm, lam, density):
    """W = W_base + tau_m. Note that the VLM's own task vector is replaced by its trimmed part:
    that is why TIES loses perception in the paper's Tab. 1."""
    t_vlm, t_lrm = trim(tau_vlm, density), trim(tau_lrm, density)
    s = torch.where(t_vlm + t_lrm >= 0, 1.0, -1.0)  # elected sign; 0 counts as +
    agree_vlm = (t_vlm != 0) & (torch.sign(t_vlm) == s)
    agree_lrm = (t_lrm != 0) & (torch.sign(t_lrm) == s)
    tau_m = (t_vlm * agree_vlm + lam * t_lrm * agree_lrm) / (
        agree_vlm.float() + agree_lrm.float()).clamp(min=1)  # disjoint mean
    conflicts = ((t_vlm != 0) & (t_lrm != 0) & (torch.sign(t_vlm) != torch.sign(t_lrm)))
    return W_base + tau_m, {"sign_conflicts": conflicts.float().mean().item()}


# ----------------------------------------------------------------------------------------------
# DARE (Yu et al., ICML 2024): drop entries of the task vector at random, rescale the rest.
# ----------------------------------------------------------------------------------------------

def dare(W_vlm, tau_lrm, lam, density, generator):
    """Keep each entry with probability `density`, rescaled by 1 / density (so its expectation is
    tau_lrm); density 1 is Task Arithmetic exactly."""
    mask = torch.rand(tau_lrm.shape, generator=generator) < density  # seeded, on the CPU
    mask = mask.to(tau_lrm.device)
    return W_vlm + lam * mask * tau_lrm / density, {"kept": mask.float().mean().item()}


# ----------------------------------------------------------------------------------------------
# IP-Merging (Hu et al., NeurIPS 2025, arXiv 2510.14387), as in the authors' early public code;
# the published version may differ. Identify the layers whose reasoning directions align with the
# VLM's, project the LRM's update onto the VLM's input subspace, rescale it to the VLM's size.
# ----------------------------------------------------------------------------------------------

def ip_projection(Vh_A, w):
    """P = Vh_A^T diag(w^2) Vh_A: symmetric, trace sum(w^2) (the rows of Vh_A are orthonormal)."""
    return (Vh_A.T * w ** 2) @ Vh_A


def ip_merging(W_vlm, tau_vlm, tau_lrm, lam, threshold, rank):
    U_A, S_A, Vh_A = torch.linalg.svd(tau_vlm, full_matrices=False)
    U_M, S_M, Vh_M = torch.linalg.svd(tau_lrm, full_matrices=False)
    k = min(rank, len(S_A))
    # Ours: the absolute cosine, because the sign of a singular vector is arbitrary.
    c = (Vh_A[:k] * Vh_M[:k]).sum(1).abs()
    stats = {"max_cos": c.max().item(), "passed": c.max().item() >= threshold}
    if not stats["passed"]:  # identify: this layer stays the VLM's
        return W_vlm, stats
    w = torch.softmax(32 * c, dim=0)
    P = ip_projection(Vh_A[:k], w)  # project
    s = S_A[:k].sum() / S_M[:k].sum()  # rescale
    stats["scale"] = s.item()
    return W_vlm + lam * s * ((U_M[:, :k] * S_M[:k]) @ Vh_M[:k]) @ P, stats


# ----------------------------------------------------------------------------------------------
# Selective transfer (Ji et al. 2026, "Selective Transfer of RL Updates for Visual Reasoning",
# their direct route): the top-k part of tau, rescaled to tau's whole Frobenius norm.
# ----------------------------------------------------------------------------------------------

def selective(W_vlm, tau, lam, k):
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    tau_k = (U[:, :k] * S[:k]) @ Vh[:k]
    norm_k = tau_k.norm()
    tau_hat = tau_k * (tau.norm() / norm_k) if norm_k > 0 else tau_k  # a zero tau stays zero
    energy = (S[:k] ** 2).sum() / (S ** 2).sum() if S.sum() > 0 else torch.tensor(1.0)
    return W_vlm + lam * tau_hat, {"retained_energy": energy.item()}


# ----------------------------------------------------------------------------------------------
# STAR (Lee et al., NAACL 2025, as in the authors' public code): keep the fewest directions whose
# singular values sum to eta % of the nuclear norm, then scale them so that it is restored.
# ----------------------------------------------------------------------------------------------

def star(W_vlm, tau, lam, eta):
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    r = min(len(S), int((torch.cumsum(S, 0) < eta / 100 * S.sum()).sum()) + 1)
    S_r = S[:r] * (S.sum() / S[:r].sum()) if S[:r].sum() > 0 else S[:r]
    return W_vlm + lam * (U[:, :r] * S_r) @ Vh[:r], {"rank": r}


# ----------------------------------------------------------------------------------------------
# TSV-Merge (Gargiulo et al., CVPR 2025, as in the authors' public code), over the VLM's and the
# LRM's task vectors: half of each one's singular directions, stacked, then decorrelated by
# replacing the stacked U and Vh with their nearest orthogonal matrices (polar factors).
# ----------------------------------------------------------------------------------------------

def polar(X):
    """X = P Sigma Q  ->  P Q: the orthogonal factor of X's polar decomposition."""
    P, _, Q = torch.linalg.svd(X, full_matrices=False)
    return P @ Q


def tsv(W_base, tau_vlm, tau_lrm, alpha):
    k = min(tau_lrm.shape) // 2  # min(m, n) / T directions of each of the T = 2 task vectors
    parts = [torch.linalg.svd(tau, full_matrices=False) for tau in (tau_vlm, tau_lrm)]
    U = torch.cat([U[:, :k] for U, _, _ in parts], dim=1)
    S = torch.cat([S[:k] for _, S, _ in parts])
    Vh = torch.cat([Vh[:k] for _, _, Vh in parts], dim=0)
    overlap = (U.T @ U - torch.eye(2 * k, device=U.device)).norm().item()
    return W_base + alpha * (polar(U) * S) @ polar(Vh), {"k": k, "u_overlap": overlap}


# ----------------------------------------------------------------------------------------------
# The table: one row a method. Every rule takes (W_vlm, W_base, tau_lrm, o), o holding the
# method's flags (and a seeded generator), and returns (merged W in fp32, {figure: value}).
# ----------------------------------------------------------------------------------------------

class Method(NamedTuple):
    rule: Callable
    paper: str
    defaults: dict  # flag -> default; these flags, and only these, are the method's own
    defaults_from: str = "ours"
    helps: dict = {}  # flag -> this method's own help text, where FLAGS' shared one does not fit


METHODS = {
    "ta": Method(lambda W_vlm, W_base, tau, o: (W_vlm + o.lam * tau, {}),
                 "Task Arithmetic (Ilharco et al., ICLR 2023): W = W_vlm + lam * tau.",
                 dict(lam=1.0), "lam 1: the LRM's whole task vector; the paper reports its best "
                 "lambda, which it does not publish"),
    "ties": Method(lambda W_vlm, W_base, tau, o: ties(W_base, W_vlm - W_base, tau, o.lam,
                                                      o.density),
                   "TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.",
                   dict(lam=1.0, density=0.2), "density 0.2: the TIES paper's top-20 %",
                   helps=dict(lam="weight of the LRM's trimmed task vector in the disjoint mean",
                              density="fraction of each task vector's entries kept by the trim")),
    "dare": Method(lambda W_vlm, W_base, tau, o: dare(W_vlm, tau, o.lam, o.density, o.generator),
                   "DARE (Yu et al., ICML 2024): random drop of tau's entries, rescaled.",
                   dict(lam=1.0, density=0.1, seed=0), "density 0.1, ours: DARE's paper drops "
                   "90 % and more of SFT task vectors without loss",
                   helps=dict(density="probability that an entry of tau is kept")),
    "ip": Method(lambda W_vlm, W_base, tau, o: ip_merging(W_vlm, W_vlm - W_base, tau, o.lam,
                                                          o.threshold, o.ip_rank),
                 "IP-Merging (Hu et al., NeurIPS 2025): identify, project, rescale.",
                 dict(lam=1.0, threshold=0.4, ip_rank=1024),
                 "T 0.4 and k 1024: the authors' early public code",
                 helps=dict(lam="weight of the projected, rescaled update")),
    "selective": Method(lambda W_vlm, W_base, tau, o: selective(W_vlm, tau, o.lam, o.rank),
                        "Selective transfer (Ji et al. 2026): rank-k tau rescaled to its "
                        "Frobenius norm.", dict(lam=0.05, rank=1),
                        "lam 0.05 and k 1: the authors' values for Qwen3-VL-8B",
                        helps=dict(lam="weight of the rank-k update, rescaled to tau's norm")),
    "star": Method(lambda W_vlm, W_base, tau, o: star(W_vlm, tau, o.lam, o.eta),
                   "STAR (Lee et al., NAACL 2025): spectral truncation and nuclear-norm rescale.",
                   dict(lam=1.0, eta=40.0), "eta 40: the authors' default; lam 1: ours",
                   helps=dict(lam="weight of the truncated update, rescaled to tau's nuclear "
                              "norm")),
    "tsv": Method(lambda W_vlm, W_base, tau, o: tsv(W_base, W_vlm - W_base, tau, o.alpha),
                  "TSV-Merge (Gargiulo et al., CVPR 2025): task singular vectors, decorrelated.",
                  dict(alpha=1.0), "alpha 1: ours; the authors select it on validation data "
                  "between 0.1 and 3", helps=dict(alpha="scale of the merged task matrix of "
                                                  "both task vectors (the authors tune it in 0.1-3)")),
}

# Every flag a rule may read: (type, help, the test a value must pass, what that test says).
FLAGS = {
    "lam": (float, "weight of the LRM's task vector", math.isfinite, "a finite number"),
    "density": (float, "fraction of the task vector's entries kept",
                lambda v: 0 < v <= 1, "in (0, 1]"),
    "seed": (int, "seed of the random masks", lambda v: True, "an integer"),
    "threshold": (float, "a layer is merged only if its max |cosine| reaches this",
                  lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "ip_rank": (int, "singular directions compared", lambda v: v >= 1, "a positive integer"),
    "rank": (int, "singular directions kept (k)", lambda v: v >= 1, "a positive integer"),
    "eta": (float, "percent of the nuclear norm the kept directions reach",
            lambda v: 0 < v <= 100, "in (0, 100]"),
    "alpha": (float, "scale of the merged update", math.isfinite, "a finite number"),
}


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--vlm", required=True, help="the VLM: hub id or local directory")
    common.add_argument("--lrm", required=True, help="the reasoning LLM")
    common.add_argument("--base", required=True, help="the LLM the LRM was fine-tuned from: tau = "
                        "LRM - base (a method that uses the VLM's task vector takes VLM - base)")
    common.add_argument("--out", required=True, help="directory for the merged model (must not "
                        "exist or be empty, unless --overwrite)")
    common.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (cuda when there is a GPU)")
    common.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="working dtype; if not given, bfloat16 on GPU, float32 on CPU")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    methods = p.add_subparsers(dest="method", required=True, metavar="method",
                               help=", ".join(METHODS))
    for name, method in METHODS.items():
        sub = methods.add_parser(name, parents=[common], help=method.paper, allow_abbrev=False,
                                 description=f"{method.paper} Defaults: {method.defaults_from}.",
                                 formatter_class=frism.HelpWithDefaults)
        for flag, default in method.defaults.items():
            kind, text, _, _ = FLAGS[flag]
            sub.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=default,
                             help=method.helps.get(flag, text))
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


def check_numbers(args):
    for flag in METHODS[args.method].defaults:
        _, _, valid, rule = FLAGS[flag]
        if not valid(getattr(args, flag)):
            raise frism.InputError(f"--{flag.replace('_', '-')} must be {rule}, "
                                   f"not {getattr(args, flag)}.")


# ----------------------------------------------------------------------------------------------
# Streamed over the layers, then saved as an ordinary checkpoint
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def merge(model, lrm_index, base_index, args):
    """Replace each merged weight in place, one layer at a time; {layer path: figures}."""
    rule = METHODS[args.method].rule
    o = argparse.Namespace(**{flag: getattr(args, flag) for flag in METHODS[args.method].defaults},
                           generator=torch.Generator().manual_seed(getattr(args, "seed", 0)))
    figures = {}
    for name, (path, linear) in tqdm(frism.decoder_layers(model).items(), desc=args.method):
        W_vlm, device = linear.weight.float(), linear.weight.device
        W_base = frism.read_weight(base_index, name).to(device)
        tau_lrm = frism.read_weight(lrm_index, name).to(device) - W_base
        W, figures[path] = rule(W_vlm, W_base, tau_lrm, o)
        linear.weight.copy_(W.to(linear.weight.dtype))  # fp32 arithmetic, cast once
    return figures


def summary(figures):
    """Each figure over the layers: numbers as mean (min-max), yes/no figures as a count."""
    lines, counts = [], {}
    for key in sorted({k for f in figures.values() for k in f}):
        values = [f[key] for f in figures.values() if key in f]
        if all(isinstance(v, bool) for v in values):
            counts[f"layers_{key}"] = sum(values)
            lines.append(f"{key}: {sum(values)} of {len(values)} layers")
        else:
            lines.append(f"{key}: mean {sum(values) / len(values):.4g} "
                         f"(min {min(values):.4g}, max {max(values):.4g}) over {len(values)} layers")
    return lines, counts


def run(args, command=""):
    started = time.perf_counter()
    check_numbers(args)
    frism.remove_stale_staging(args.out, "baselines.py")
    vlm, lrm_index, base_index = frism.check_inputs(args.vlm, args.lrm, args.base, args.out,
                                                    args.overwrite)
    model, processor = frism.load_vlm(vlm, args.dtype, args.device)
    figures = merge(model, lrm_index, base_index, args)
    lines, counts = summary(figures)
    report = {"method": args.method, "args": vars(args), "command": command,
              "versions": frism.versions(), "seconds": round(time.perf_counter() - started, 3),
              "layers": figures, **counts}
    settings = {f"--{k.replace('_', '-')}": getattr(args, k) for k in METHODS[args.method].defaults}
    card = frism.model_card(args.vlm, args.lrm, args.base, args.method, METHODS[args.method].paper,
                            settings, lines or ["no per-layer figures for this method"], command)
    frism.save(model, processor, args.out, frism.checkpoint_dtype(vlm, model.dtype),
               {"baselines_report.json": frism.write_json(report), "README.md": card},
               args.overwrite)
    return report


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(getattr(args, "seed", 0))
    code, report = frism.guarded("baselines.py", args.out, lambda: run(
        args, frism.command_line("baselines.py", argv)))
    if code == 0:
        passed = (f", {report['layers_passed']} of {len(report['layers'])} layers passed "
                  f"the threshold" if "layers_passed" in report else "")
        print(f"{args.method} merge written to {args.out} ({report['seconds']:.1f} s{passed}).")
    return code


if __name__ == "__main__":
    sys.exit(main())
