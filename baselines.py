"""The methods FRISM is compared with (the paper's Tab. 1), on the same streamed task vectors.

For every merged linear weight (the seven projections of each decoder layer that frism.py
merges), with tau_vlm = W_vlm - W_base and tau_lrm = W_lrm - W_base in fp32, the result cast
once to the model's dtype; every other tensor stays the VLM's, bit for bit:

  ta    Task Arithmetic         W = W_vlm + lam * tau_lrm                  (= frism.py --no-train)
  ties  TIES-Merging            W = W_base + disjoint_mean(trim(tau_vlm), lam * trim(tau_lrm))
  dare  DARE                    W = W_vlm + lam * mask * tau_lrm / density
  ip    IP-Merging              W = W_vlm + lam * s * tau_lrm_k P   (layers that pass a threshold)

    python baselines.py ties --vlm Qwen/Qwen2.5-VL-7B-Instruct \\
        --lrm deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --base Qwen/Qwen2.5-Math-7B --out ties-7b

The input checks, the streamed reading and the atomic save are frism.py's; this file holds only
the merge rules. The output is an ordinary checkpoint of the VLM's class plus baselines_report.json.
"""
import argparse
import math
import sys
import time

import torch
from tqdm.auto import tqdm

import frism

DEFAULTS = {"ta": dict(lam=1.0), "ties": dict(lam=1.0, density=0.2),
            "dare": dict(lam=1.0, density=0.1), "ip": dict(lam=1.0, threshold=0.4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults per method: " + "; ".join(
                                    f"{m}: " + ", ".join(f"--{k} {v}" for k, v in d.items())
                                    for m, d in DEFAULTS.items()))
    p.add_argument("method", choices=list(DEFAULTS), help="which merge")
    p.add_argument("--vlm", required=True, help="the VLM: hub id or local save_pretrained directory")
    p.add_argument("--lrm", required=True, help="the reasoning LLM")
    p.add_argument("--base", required=True, help="the one base of both task vectors")
    p.add_argument("--out", required=True, help="directory for the merged model (must not exist "
                   "or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--lam", type=float, default=None, help="weight of the LRM's task vector")
    p.add_argument("--density", type=float, default=None,
                   help="ties: fraction of each task vector kept; dare: keep probability")
    p.add_argument("--threshold", type=float, default=None,
                   help="ip: a layer is merged only if its max |cosine| reaches this")
    p.add_argument("--ip-rank", type=int, default=1024, help="ip: singular directions compared")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the random masks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="working dtype (default: bfloat16 on GPU, float32 on CPU)")
    args = p.parse_args(argv)
    for flag, value in DEFAULTS[args.method].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.device_map, args.dry_run = None, False  # what frism.load_vlm and frism.main look at
    return args


def check_numbers(args):
    frism.check_numbers(args)  # --lam finite
    if args.density is not None and not 0 < args.density <= 1:
        raise frism.InputError(f"--density must be in (0, 1], not {args.density}.")
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise frism.InputError(f"--threshold must be a finite number >= 0, not {args.threshold}.")
    if args.ip_rank < 1:
        raise frism.InputError("--ip-rank must be a positive integer.")


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
# Streamed over the layers, then saved as an ordinary checkpoint
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def merge(model, lrm_index, base_index, args):
    """Replace each merged weight in place, one layer at a time; {layer path: figures}."""
    if args.method == "ta":  # the same code as frism.py --no-train
        frism.task_arithmetic(model, lrm_index, base_index, args)
        return {}
    generator = torch.Generator().manual_seed(args.seed)
    figures = {}
    for name, (path, linear) in tqdm(frism.decoder_layers(model).items(), desc=args.method):
        W_vlm, device = linear.weight.float(), linear.weight.device
        W_base = frism.read_weight(base_index, name).to(device)
        tau_lrm = frism.read_weight(lrm_index, name).to(device) - W_base
        if args.method == "ties":
            W, figures[path] = ties(W_base, W_vlm - W_base, tau_lrm, args.lam, args.density)
        elif args.method == "dare":
            W, figures[path] = dare(W_vlm, tau_lrm, args.lam, args.density, generator)
        else:
            W, figures[path] = ip_merging(W_vlm, W_vlm - W_base, tau_lrm, args.lam,
                                          args.threshold, args.ip_rank)
        linear.weight.copy_(W.to(linear.weight.dtype))  # fp32 arithmetic, cast once
    return figures


def run(args):
    started = time.perf_counter()
    check_numbers(args)
    vlm, lrm_index, base_index = frism.check_inputs(args)
    model, processor = frism.load_vlm(vlm, args)
    figures = merge(model, lrm_index, base_index, args)
    report = {"method": args.method, "args": vars(args), "versions": frism.versions(),
              "seconds": round(time.perf_counter() - started, 3), "layers": figures}
    if args.method == "ip":
        report["layers_passed"] = sum(f["passed"] for f in figures.values())
    frism.save(model, processor, args.out, frism.checkpoint_dtype(vlm, model.dtype),
               {"baselines_report.json": frism.write_json(report)}, args.overwrite)
    return report


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    code, report = frism.guarded("baselines.py", args, run)
    if code == 0:
        passed = (f", {report['layers_passed']} of {len(report['layers'])} layers passed "
                  f"the threshold" if args.method == "ip" else "")
        print(f"{args.method} merge written to {args.out} ({report['seconds']:.1f} s{passed}).")
    return code


if __name__ == "__main__":
    sys.exit(main())
