"""FRISM: Fine-grained Reasoning Injection via Subspace-level Model merging (arXiv 2601.21187).

The paper, and where each part of it is in this file, in the order the file reads:

  Stage 1  tau = theta_lrm - theta_base for each merged linear layer      task_vectors
           tau = U diag(S) Vh, thin SVD, U, S, Vh frozen                  decompose
  Eq. 7    W = W_vlm + lam * U diag(sigmoid(g) * S) Vh, one gate a        GatedLinear
           singular direction, g = 0; every merged layer wrapped          inject
  Eq. 8    L_distill = KL(p_vlm || p_merged) on perception data, with     teacher_answers,
           the teacher = the VLM (every delta off), no labels             distill_loss
  Eq. 9    L_inject = - sum_l ||sigmoid(g^l) * S^l||^2, normalised        inject_loss
  Eq. 10   L = L_distill + alpha * L_inject                               eq10
           only the gates are trained                                     train
           Eq. 7 evaluated once: a plain nn.Linear again                  fold
  (TA)     every gate open: W = W_vlm + lam * tau, Task Arithmetic        task_arithmetic

A reader who stops at the banner "The program around the method" has read every step of FRISM.
Below it: command line, input checks, calibration data, speed and memory options, the lambda
scan, the dry-run memory plan, saving (model card included), the run that calls the steps in
order (run, subspace_merge), signals and main. Lines marked "ours" implement a choice the paper
leaves open; README.md lists them all.

    python frism.py --vlm Qwen/Qwen2.5-VL-7B-Instruct \\
                    --lrm deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --base Qwen/Qwen2.5-Math-7B \\
                    --out merged/
"""
import argparse
import contextlib
import ctypes
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# The linear layers FRISM merges, by their path inside one decoder layer. Ours: the paper says
# "each linear layer" of the language model; embeddings, norms, biases and lm_head stay the VLM's.
MERGED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DECODER_PATH = re.compile(r"(?:^|\.)(layers\.\d+\.(?:%s))\.weight$" % "|".join(
    re.escape(m) for m in MERGED))  # "layers.3.mlp.up_proj", whatever the checkpoint's prefix


# ==============================================================================================
# The method
# ==============================================================================================

# ---- Stage 1: task vectors, streamed one linear layer at a time, and their SVD ---------------

def read_weight(index, name):
    """One weight, read from its safetensors file alone (never a whole model), in fp32."""
    from safetensors import safe_open
    file, key, _ = index[name]
    with safe_open(file, "pt") as f:
        return f.get_tensor(key).float()


def task_vectors(lrm_index, base_index, names):
    """tau = theta_lrm - theta_base in fp32 (ours), one merged layer at a time."""
    for name in names:
        yield name, read_weight(lrm_index, name) - read_weight(base_index, name)


def decompose(tau, keep, device):
    """tau = U diag(S) Vh, singular values descending; `keep` (a slice) picks the directions
    kept: all as in the paper, the top k with --rank, a band with --band."""
    U, S, Vh = torch.linalg.svd(tau.to(device), full_matrices=False)
    if keep != slice(None):  # copies, so that the dropped directions' memory is freed
        U, S, Vh = U[:, keep].clone(), S[keep].clone(), Vh[keep].clone()
    return U, S, Vh


# ---- Eq. 7: the gated layer, W = W_vlm + lam * U diag(sigmoid(g) * S) Vh ----------------------

class GatedLinear(nn.Module):
    """A frozen VLM linear layer plus the LRM's task vector, one sigmoid gate per subspace.
    Every parameter this module adds is trained and saved (a fork may add its own)."""

    def __init__(self, base, U, S, Vh, lam, gate_init=0.0):
        super().__init__()
        self.base, self.lam, self.delta_on = base, lam, True
        dtype = base.weight.dtype  # ours: U, Vh in the working dtype; S and g in fp32
        self.register_buffer("U", U.to(dtype), persistent=False)
        self.register_buffer("Vh", Vh.to(dtype), persistent=False)
        self.register_buffer("S", S.float(), persistent=False)
        self.g = nn.Parameter(torch.full_like(self.S, gate_init))  # paper: g = 0

    def effective_S(self):
        return torch.sigmoid(self.g) * self.S  # S_eff of Eq. 7

    def forward(self, x):
        y = self.base(x)
        if not self.delta_on:  # the teacher: exactly the VLM's layer
            return y
        # Eq. 7 applied as a low-rank path; the dense delta is never materialised.
        scale = (self.lam * self.effective_S()).to(x.dtype)
        return y + ((x @ self.Vh.T) * scale) @ self.U.T

    @torch.no_grad()
    def folded_weight(self):
        """The Eq. 7 weight as one dense matrix: computed in fp32, cast once (ours)."""
        delta = (self.U.float() * self.effective_S()) @ self.Vh.float()
        return (self.base.weight.float() + self.lam * delta).to(self.base.weight.dtype)


def decoder_layers(model):
    """{decoder path ("layers.3.mlp.up_proj"): (module path in the VLM, nn.Linear)}."""
    decoder = model.get_decoder()
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    return {name: (f"{prefix}.{name}", module) for name, module in decoder.named_modules()
            if isinstance(module, nn.Linear) and DECODER_PATH.search(name + ".weight")}


def set_module(model, path, module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def inject(model, lrm_index, base_index, args):
    """Stage 1 and Eq. 7: every merged nn.Linear of the VLM becomes a GatedLinear, one at a time;
    {module path: GatedLinear}."""
    layers, gated, keep = decoder_layers(model), {}, kept_directions(args)
    taus = task_vectors(lrm_index, base_index, list(layers))
    for name, tau in tqdm(taus, total=len(layers), desc="SVD of task vectors"):
        path, linear = layers[name]
        U, S, Vh = decompose(tau, keep, linear.weight.device)  # with its layer, on its device
        del tau  # ours: nothing but the frozen factors outlives this loop
        gated[path] = GatedLinear(linear, U, S, Vh, args.lam, args.gate_init)
        set_module(model, path, gated[path])
    return gated


def kept_directions(args):
    """All singular directions (the paper), the top k (--rank k), or a band (--band FIRST LAST)."""
    if getattr(args, "band", None):
        return slice(args.band[0] - 1, args.band[1])
    return slice(None, args.rank)


@contextlib.contextmanager
def deltas_off(gated):
    """With every delta off the merged model *is* the VLM: the teacher, without a second copy."""
    for layer in gated.values():
        layer.delta_on = False
    try:
        yield
    finally:
        for layer in gated.values():
            layer.delta_on = True


def task_arithmetic(model, lrm_index, base_index, lam):
    """Eq. 7 with every gate open at full rank is W = W_vlm + lam * tau: Task Arithmetic, done
    exactly and without an SVD (--no-train). Returns the layers it changed."""
    layers = decoder_layers(model)
    for name, tau in tqdm(task_vectors(lrm_index, base_index, list(layers)), total=len(layers),
                          desc="Task Arithmetic"):
        w = layers[name][1].weight
        w.copy_((w.float() + lam * tau.to(w.device)).to(w.dtype))
    return layers


# ---- the teacher's answers: what Eq. 8 is measured on ----------------------------------------

class Answer(NamedTuple):
    """One calibration question with the teacher's answer (token ids, end of turn included);
    teacher_logp holds the teacher's log-probs at the answer positions once cached."""
    image: object
    question: str
    ids: list
    teacher_logp: Optional[torch.Tensor] = None


def chat_prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_ids(model, tokenizer):
    """Every token id that ends a turn: the generation config's (one or a list) and the tokenizer's."""
    stop = model.generation_config.eos_token_id
    return set(stop if isinstance(stop, list) else [stop]) | {tokenizer.eos_token_id}


@torch.no_grad()
def teacher_answers(model, processor, gated, samples, args):
    """Ours: the teacher (every delta off) answers each question once, greedily; the answers are
    cached, the closing end-of-turn token included. Empty answers are dropped."""
    stop = end_of_turn_ids(model, processor.tokenizer)
    answers = []
    with deltas_off(gated):
        for i in tqdm(range(0, len(samples), args.batch_size), desc="Teacher answers"):
            chunk = samples[i:i + args.batch_size]
            inputs = processor(text=[chat_prompt(processor, q) for _, q in chunk],
                               images=[[image] for image, _ in chunk], padding=True,
                               padding_side="left", return_tensors="pt").to(model.device)
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            for (image, question), ids in zip(chunk, out[:, inputs["input_ids"].shape[1]:].tolist()):
                ends = [n for n, t in enumerate(ids) if t in stop]
                ids = ids[:ends[0] + 1] if ends else ids  # cut by the limit: kept as it is
                if ids[0] not in stop:
                    answers.append(Answer(image, question, ids))
    return answers


# ---- Eq. 8: vision preservation, KL(p_vlm || p_merged) at the answer positions ---------------

def make_batch(processor, items, device):
    """Prompt + answer per item, right-padded. One processor call over the whole batch, one
    image list per sample, so tiles, crops and image-token counts are the processor's business
    whatever the model family; each answer is then written after its prompt.
    mask[b, t] is True where the token at t+1 is an answer token: the logits at t predict it."""
    prompts = processor(text=[chat_prompt(processor, item.question) for item in items],
                        images=[[item.image] for item in items], padding=True,
                        padding_side="right", return_tensors="pt")
    lengths = prompts["attention_mask"].sum(1).tolist()
    answers = [item.ids for item in items]
    length = max(n + len(a) for n, a in zip(lengths, answers))
    per_token = [k for k, v in prompts.items() if v.shape == prompts["input_ids"].shape]
    batch = dict(prompts)
    for k in per_token:  # input_ids, attention_mask and any per-token type ids
        v = prompts[k]
        pad = processor.tokenizer.pad_token_id if k == "input_ids" else 0
        batch[k] = torch.full((len(items), length), pad, dtype=v.dtype)
        for b, (n, a) in enumerate(zip(lengths, answers)):
            tail = {"input_ids": a, "attention_mask": [1] * len(a)}.get(k, [0] * len(a))
            batch[k][b, :n] = v[b, :n]
            batch[k][b, n:n + len(a)] = torch.tensor(tail, dtype=v.dtype)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for b, (n, a) in enumerate(zip(lengths, answers)):
        mask[b, n - 1:n - 1 + len(a)] = True
    return {k: v.to(device) for k, v in batch.items()}, mask.to(device)


def answer_logits(model, batch, mask):
    """Logits at the answer positions only: the full (batch, length, vocab) tensor is never built."""
    hidden = model.model(**batch, use_cache=False).last_hidden_state
    return model.lm_head(hidden[mask.to(hidden.device)]).float()


def distill_loss(model, gated, batch, mask, teacher=None):
    """Eq. 8: KL(p_vlm || p_merged) per answer token over the full vocabulary, token mean (ours).
    The teacher's log-probs are computed here, deltas off, unless they were cached."""
    if teacher is None:
        with torch.no_grad(), deltas_off(gated):
            teacher = F.log_softmax(answer_logits(model, batch, mask), dim=-1)
    student = F.log_softmax(answer_logits(model, batch, mask), dim=-1)
    return F.kl_div(student, teacher.to(student.device), log_target=True, reduction="batchmean")


# ---- Eq. 9: reasoning absorption, the injected spectral energy --------------------------------

def inject_loss(gated):
    """Eq. 9, normalised by sum_l ||S^l||^2 (ours, after the paper's Appendix H): in (-1, 0)."""
    device = next(iter(gated.values())).g.device  # with --device-map the layers are spread
    energy = sum((layer.effective_S() ** 2).sum().to(device) for layer in gated.values())
    return -energy / sum((layer.S ** 2).sum().to(device) for layer in gated.values())


# ---- Eq. 10: the objective, one function of the batch's KL and the gated layers --------------

def eq10(alpha):
    """FRISM's objective. A fork passes train() another function (kl, gated) -> loss."""
    return lambda kl, gated: kl + alpha * inject_loss(gated)  # Eq. 10


# ---- the training loop: label-free self-distillation -----------------------------------------

def trained_parameters(gated):
    """Every parameter the gated layers add (FRISM: the gates g); the VLM's own stay frozen."""
    return {f"{path}.{name}": p for path, layer in gated.items()
            for name, p in layer.named_parameters() if p.requires_grad}


def batches(items, size, seed):
    """The calibration set, shuffled and cycled for as long as training asks (ours)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in range(0, len(order), size):
            yield [items[j] for j in order[i:i + size]]


def mean_gate(gated):
    """What the progress bar shows: the mean of sigmoid(g) over every gate."""
    gates = torch.cat([torch.sigmoid(layer.g.detach()).flatten() for layer in gated.values()])
    return gates.mean().item()


def train(model, processor, gated, answers, args, objective=None):
    """Minimise the objective (Eq. 10 unless a fork passes another) over the gated layers'
    parameters; returns the loss curve."""
    objective = objective or eq10(args.alpha)
    # Ours: AdamW without weight decay, which would pull every gate towards 0.5.
    optimizer = torch.optim.AdamW(trained_parameters(gated).values(), lr=args.lr, weight_decay=0.0)
    data, history = batches(answers, args.batch_size, args.seed), []
    bar = tqdm(range(1, args.steps + 1), desc="Training gates")
    with checkpointing(model, args.gradient_checkpointing):
        for step in bar:
            loss_total = kl_total = 0.0
            for _ in range(args.grad_accum):
                items = next(data)
                batch, mask = make_batch(processor, items, model.device)
                cached = [item.teacher_logp for item in items]
                kl = distill_loss(model, gated, batch, mask,
                                  None if cached[0] is None else torch.cat(cached))
                loss = objective(kl, gated)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at step {step}; try "
                                             f"a smaller --lr or --lam, or --dtype float32.")
                (loss / args.grad_accum).backward()
                kl_total += kl.item() / args.grad_accum
                loss_total += loss.item() / args.grad_accum
            with torch.no_grad():
                injected = -inject_loss(gated).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": loss_total, "kl": kl_total,
                            "injected": injected, "mean_gate": mean_gate(gated)})
            bar.set_postfix(loss=f"{loss_total:.4f}", kl=f"{kl_total:.4f}",
                            injected=f"{injected:.3f}", gate=f"{history[-1]['mean_gate']:.3f}")
    return history


# ---- after training: fold each gated layer back into a plain dense weight --------------------

@torch.no_grad()
def fold(model, gated):
    for path, layer in gated.items():
        layer.base.weight.copy_(layer.folded_weight())
        set_module(model, path, layer.base)


# ==============================================================================================
# The program around the method: command line, checks, data, scan, dry run, saving, main
# ==============================================================================================

# Config fields that fix a merged weight's shape must agree; these others only earn a warning.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
SOFT_FIELDS = ("rope_theta", "vocab_size", "max_position_embeddings")
# The paper's calibration set (columns image, question, answers), where the Hub now hosts it:
# lmms-lab/VizWiz-VQA moved to lmms-lab-encoder/ in 2026, as POPE and MME did (see eval.py).
VIZWIZ = "lmms-lab-encoder/VizWiz-VQA"
# A vision tower's layers can have the same inner names (Gemma 3, SmolVLM, LLaVA-OneVision:
# "...vision_model.encoder.layers.3.self_attn.q_proj"): only the language model is ever read.
VISION_PREFIX = re.compile(r"vision|visual|image|mm_projector|multi_modal")


class InputError(Exception):
    """A problem with what the user asked for: reported as one sentence, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vlm", required=True, help="the VLM: hub id or local save_pretrained directory")
    p.add_argument("--lrm", required=True, help="the reasoning LLM whose task vector is injected")
    p.add_argument("--base", required=True, help="the LLM the LRM was fine-tuned from; tau = LRM - "
                   "base (the paper does not name it: always given)")
    p.add_argument("--out", help="directory for the merged model (must not exist or be empty, "
                   "unless --overwrite); required unless --dry-run or --scan")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--data", default=VIZWIZ, help="label-free perception set (paper: VizWiz VQA, "
                   'at its current Hub id): a .jsonl file of {"image": path, "question": text} '
                   "lines, a hub dataset id, a local directory of data files, or a "
                   "datasets.save_to_disk directory")
    p.add_argument("--data-split", default="val", help="split of a hub/local dataset")
    p.add_argument("--image-column", default="image", help="image column of a dataset")
    p.add_argument("--question-column", default="question", help="question column of a dataset")
    p.add_argument("--num-samples", type=int, default=512,
                   help="use at most this many calibration questions (ours)")
    p.add_argument("--max-pixels", type=int, default=512 * 28 * 28,
                   help="shrink larger images to this many pixels (ours: VizWiz photos are large)")
    p.add_argument("--lam", type=float, default=0.2,
                   help="lambda_lrm of Eq. 7: each gate scales its subspace from 0 to lam (ours: "
                   "the paper does not publish it; its 7B Task Arithmetic loses POPE at 0.15 and "
                   "the gates start at half, so 0.2 starts at TA 0.1; run --scan first)")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of L_inject in Eq. 10 "
                   "(ours: the paper does not publish it; measured in toy.py, see README)")
    p.add_argument("--gate-init", type=float, default=0.0, help="initial logit of every gate "
                   "(paper: 0, half open; the flag is ours, for the ablation: a larger value "
                   "starts nearer Task Arithmetic at lam)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps on the gates (ours)")
    p.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate of the gates (ours)")
    p.add_argument("--batch-size", type=int, default=4, help="questions per forward pass (ours)")
    p.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="length limit of the teacher's cached answers (ours)")
    p.add_argument("--rank", type=int, default=None,
                   help="keep only the top-k subspaces of each layer (default: all, as the paper)")
    p.add_argument("--band", type=int, nargs=2, metavar=("FIRST", "LAST"), help="keep only "
                   "singular directions FIRST..LAST of each layer (1-based, inclusive): with "
                   "--no-train, the paper's injection of single subspaces (its Fig. 3)")
    p.add_argument("--no-train", action="store_true", help="skip training and open every gate: "
                   "Task Arithmetic W = W_vlm + lam * tau (truncated to --rank if given)")
    p.add_argument("--scan", type=float, nargs="+", metavar="LAM", help="no training, no model: "
                   "print Task Arithmetic's KL to the VLM (Eq. 8, every gate open; truncated "
                   "with --rank) at each LAM on the teacher's calibration answers, to choose "
                   "--lam (ours); with --out, the table goes to OUT/frism_report.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs")
    p.add_argument("--device-map", default=None, help="e.g. auto: spread the VLM over every GPU "
                   "(needs accelerate); each gated layer then lives with its layer")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="working dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order")
    p.add_argument("--dry-run", action="store_true", help="check the configs and print a memory "
                   "plan (weights, factors, activations) without loading or downloading weights")
    p.add_argument("--device-memory", type=float, default=None,
                   help="GiB the plan must fit in (default: the GPU's own memory)")
    p.add_argument("--cache-teacher", nargs="?", const="yes", default="auto",
                   choices=["auto", "yes", "no"], help="compute the teacher's answer log-probs "
                   "once instead of every step: faster, at answer tokens x vocabulary x 4 bytes "
                   "of host memory; auto: when that saves teacher passes and takes at most half "
                   "the available host memory")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass: less memory, ~50%% "
                        "more time a step")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    return args


# ---- input checks, before anything heavy -----------------------------------------------------

def check_numbers(args):
    """Every numeric flag, before any work: a typo must not become a model of NaNs."""
    for flag in ("steps", "batch_size", "grad_accum", "num_samples", "max_new_tokens", "rank"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be a positive integer.")
    ranges = {"lam": (-math.inf, False), "alpha": (0.0, True), "lr": (0.0, False),
              "device_memory": (0.0, False), "gate_init": (-math.inf, False)}  # (lowest, allowed)
    for flag, (low, inclusive) in ranges.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            rule = "a finite number" + ("" if low == -math.inf else
                                        f" {'>=' if inclusive else '>'} {low:g}")
            raise InputError(f"--{flag.replace('_', '-')} must be {rule}, not {value}.")
    band = getattr(args, "band", None)
    if band and not (1 <= band[0] <= band[1]):
        raise InputError("--band FIRST LAST needs 1 <= FIRST <= LAST.")
    if band and getattr(args, "rank", None):
        raise InputError("--band and --rank both choose directions: give one of them.")
    if not all(math.isfinite(lam) for lam in getattr(args, "scan", None) or []):
        raise InputError("--scan takes finite numbers only.")
    if getattr(args, "max_pixels", 784) < 28 * 28:
        raise InputError("--max-pixels must be at least 784 (one 28 x 28 patch).")


def check_model_name(name, flag):
    """A local directory, or something shaped like a hub id ("org/name"): else one clear error."""
    if not os.path.isdir(name) and (os.path.exists(name) or name.startswith((".", "/", "~"))
                                    or name.count("/") != 1):
        raise InputError(f"{flag} {name!r} is not a model directory or a hub id.")


def local_dir(name, flag):
    """A local model directory as is; a hub id downloaded (or found in the hub cache)."""
    check_model_name(name, flag)
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                       "*.jinja", "*.model", "*.tiktoken"])
    except Exception as e:
        raise InputError(f"{flag} {name!r} could not be fetched from the hub ({type(e).__name__})."
                         ) from e


def load_config(name, flag):
    """The whole config of a model directory or hub id (only config.json is fetched)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        raise InputError(f"{flag} {name!r} has no readable config.json ({type(e).__name__}).") from e


def language_config(cfg):
    """The language model's part of a config: a VLM's text_config, an LLM's config itself."""
    return getattr(cfg, "text_config", None) or cfg


def config_value(cfg, field):
    if field == "head_dim":
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if field == "rope_theta":  # Gemma 3 nests rope parameters per layer type
        rope = getattr(cfg, "rope_parameters", None) or {}
        rope = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
        return getattr(cfg, "rope_theta", None) or rope.get("rope_theta")
    return getattr(cfg, field, None)


def check_plain_decoder(cfg, flag):
    """FRISM merges a plain stack of decoder layers that the VLM and the text model share. A
    mixture-of-experts decoder (its experts' weights are not seven projections a layer) or one
    that interleaves cross-attention layers (Llama-3.2-Vision: layer N of the VLM is not layer N
    of the text model) would be merged silently and wrongly: refuse them."""
    experts = [getattr(cfg, k, None) for k in ("num_experts", "num_local_experts",
                                               "n_routed_experts", "moe_num_experts")]
    if any(isinstance(n, int) and n > 1 for n in experts):
        raise InputError(f"{flag} has a mixture-of-experts decoder; FRISM here merges dense "
                         f"decoders only.")
    if getattr(cfg, "cross_attention_layers", None):
        raise InputError(f"{flag} interleaves cross-attention layers in its decoder (as "
                         f"Llama-3.2-Vision does), so its layers do not line up with a text "
                         f"model's; it cannot be merged here.")


def activation(cfg):
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)


def check_configs(vlm_cfg, others):
    """Ours: shapes must match exactly; rope_theta, vocab and max positions may differ."""
    check_plain_decoder(vlm_cfg, "--vlm")
    for flag, cfg in others.items():
        check_plain_decoder(cfg, flag)
        if activation(cfg) != activation(vlm_cfg):
            raise InputError(f"{flag} uses the activation {activation(cfg)!r} where the VLM's "
                             f"language model uses {activation(vlm_cfg)!r}: not the same "
                             f"architecture, so their weights cannot be merged.")
        for field in SHAPE_FIELDS:
            a, b = config_value(vlm_cfg, field), config_value(cfg, field)
            if a != b:
                raise InputError(f"{flag} does not match the VLM's language model: {field} is "
                                 f"{b} there and {a} in the VLM, so their weights cannot be merged.")
        for field in SOFT_FIELDS:
            a, b = config_value(vlm_cfg, field), config_value(cfg, field)
            if a != b:
                warnings.warn(f"{flag} has {field}={b} where the VLM has {a}; merging anyway.")


def expected_shapes(cfg):
    """Shape (d_out, d_in) of every merged weight, from the config alone."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * config_value(cfg, "head_dim"), \
        cfg.num_key_value_heads * config_value(cfg, "head_dim")
    per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
                 "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
                 "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"layers.{n}.{m}": s for n in range(cfg.num_hidden_layers)
            for m, s in per_layer.items()}


def check_files(path, flag):
    """Every file a run reads parses: config.json, the shard index and each safetensors header
    (a download cut off half way fails here, with the file named, before any work)."""
    from safetensors import safe_open
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{flag}: {file!r} is missing or does not parse ({e}); "
                         f"re-download it.") from e
    files = {f for f in os.listdir(path) if f.endswith(".safetensors")}
    for index in (f for f in os.listdir(path) if f.endswith(".safetensors.index.json")):
        try:
            with open(os.path.join(path, index)) as f:
                named = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{flag}: {os.path.join(path, index)!r} does not parse ({e}); "
                             f"re-download it.") from e
        for missing in sorted(named - files):
            raise InputError(f"{flag}: {os.path.join(path, missing)!r} is named by {index} but "
                             f"missing; re-download it.")
    if not files:
        raise InputError(f"{flag} {path!r} holds no .safetensors weights.")
    for file in sorted(files):
        try:
            with safe_open(os.path.join(path, file), "pt") as f:
                f.keys()
        except Exception as e:
            raise InputError(f"{flag}: {os.path.join(path, file)!r} is not a readable safetensors "
                             f"file ({e}); it may be truncated: re-download it.") from e
    return sorted(files)


def safetensors_index(path, flag):
    """Map each merged layer's decoder path to (file, on-disk name, shape), reading headers only
    and only the language model's tensors; two tensors that claim one decoder path are refused."""
    from safetensors import safe_open
    index = {}
    for file in check_files(path, flag):
        with safe_open(os.path.join(path, file), "pt") as f:
            for key in f.keys():
                m = DECODER_PATH.search(key)
                if not m or VISION_PREFIX.search(key[:m.start(1)]):
                    continue
                if m.group(1) in index:
                    raise InputError(f"{flag}: two tensors claim the decoder weight {m.group(1)} "
                                     f"({index[m.group(1)][1]} and {key}); which one is the "
                                     f"language model's is ambiguous, so it is not merged.")
                index[m.group(1)] = (os.path.join(path, file), key,
                                     tuple(f.get_slice(key).get_shape()))
    return index


def check_weights(expected, indexes):
    for flag, index in indexes.items():
        for name, shape in expected.items():
            if name not in index:
                raise InputError(f"{flag} has no weight for {name}; is it the same architecture "
                                 f"as the VLM's language model?")
            if index[name][2] != shape:
                raise InputError(f"{flag} weight {name} has shape {index[name][2]}, "
                                 f"the VLM's has {shape}.")


def check_out(out, inputs, overwrite):
    out = os.path.abspath(out)
    for path in inputs:
        path = os.path.abspath(path)
        if out == path or out.startswith(path + os.sep) or path.startswith(out + os.sep):
            raise InputError(f"--out {out!r} overlaps the input {path!r}; inputs are never "
                             f"modified, choose another directory.")
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not overwrite):
        raise InputError(f"--out {out!r} exists and is not empty; pass --overwrite to "
                         f"replace it.")


def check_inputs(vlm, lrm, base, out=None, overwrite=False):
    """Everything about the three models, before any weight is read: (VLM directory, LRM index,
    base index). baselines.py checks its inputs with this too."""
    vlm, lrm, base = (local_dir(name, f"--{flag}") for name, flag in
                      ((vlm, "vlm"), (lrm, "lrm"), (base, "base")))
    if out is not None:
        check_out(out, [vlm, lrm, base], overwrite)
    check_files(vlm, "--vlm")
    vlm_cfg = language_config(load_config(vlm, "--vlm"))
    check_configs(vlm_cfg, {"--lrm": language_config(load_config(lrm, "--lrm")),
                            "--base": language_config(load_config(base, "--base"))})
    lrm_index, base_index = safetensors_index(lrm, "--lrm"), safetensors_index(base, "--base")
    check_weights(expected_shapes(vlm_cfg), {"--lrm": lrm_index, "--base": base_index})
    return vlm, lrm_index, base_index


# ---- label-free calibration data: perception questions and images, no answers ----------------

def fit_pixels(image, max_pixels):
    """Shrink an image to at most max_pixels, keeping its aspect ratio (ours)."""
    image = image.convert("RGB")
    w, h = image.size
    if w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(28, int(w * s)), max(28, int(h * s))))
    return image


def load_calibration(args):
    """A list of (image, question) pairs: from a .jsonl file, or a hub/local dataset."""
    from PIL import Image
    samples = []
    if args.data.endswith(".jsonl"):
        if not os.path.isfile(args.data):
            raise InputError(f"--data {args.data!r} does not exist.")
        root = os.path.dirname(os.path.abspath(args.data))
        with open(args.data) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    image = os.path.join(root, item["image"])
                    samples.append((Image.open(image), item["question"]))
                except (ValueError, KeyError, OSError) as e:
                    raise InputError(f"--data {args.data!r} line {n} is not a usable "
                                     f'{{"image": path, "question": text}} item ({e}).') from e
                if len(samples) == args.num_samples:
                    break
    else:
        for example in dataset_rows(args):
            samples.append((example[args.image_column], example[args.question_column]))
            if len(samples) == args.num_samples:
                break
    if not samples:
        raise InputError(f"--data {args.data!r} holds no calibration questions.")
    return [(fit_pixels(image, args.max_pixels), question) for image, question in samples]


def open_dataset(path, split, config=None, streaming=False):
    """A datasets.save_to_disk directory, or anything load_dataset reads (hub id, data files)."""
    import datasets
    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
            os.path.join(path, "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(path, config, split=split, streaming=streaming)


def dataset_rows(args):
    """Rows of a hub dataset, streamed (only what is used is downloaded), or a saved one."""
    try:
        ds = open_dataset(args.data, args.data_split, streaming=True)
    except Exception as e:
        raise InputError(f"--data {args.data!r} split {args.data_split!r} could not be loaded "
                         f"({type(e).__name__}: {e}).") from e
    columns = ds.column_names or list(ds.features or [])
    for column in (args.image_column, args.question_column):
        if columns and column not in columns:
            raise InputError(f"--data {args.data!r} has no column {column!r} (it has {columns}).")
    return ds


def load_vlm(path, dtype, device, device_map=None):
    """The VLM and its processor, frozen. Only its language model is merged."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype),
                                                        device_map=device_map)
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model, AutoProcessor.from_pretrained(path)


# ---- speed and memory around the training loop (none of it changes the objective) ----------

@torch.no_grad()
def cache_teacher(model, processor, gated, answers, args):
    """Ours, for speed (--cache-teacher): the teacher never changes, so its answer-position
    log-probs are computed once, kept in host memory in fp32, and no step runs the teacher again."""
    cached = []
    with deltas_off(gated):
        for i in tqdm(range(0, len(answers), args.batch_size), desc="Caching teacher log-probs"):
            chunk = answers[i:i + args.batch_size]
            batch, mask = make_batch(processor, chunk, model.device)
            logp = F.log_softmax(answer_logits(model, batch, mask), dim=-1).cpu()
            cached += [item._replace(teacher_logp=part) for item, part in
                       zip(chunk, logp.split([len(item.ids) for item in chunk]))]
    return cached


def host_memory_available():
    """Bytes the OS could give us now (Linux's MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def teacher_cache_decision(answers, vocab_size, args):
    """Ours, for --cache-teacher auto: cache when the steps would run the teacher on more answers
    than there are (so caching saves passes) and the cache takes at most half the free host memory."""
    size = sum(len(answer.ids) for answer in answers) * vocab_size * 4
    if args.cache_teacher != "auto":
        return args.cache_teacher == "yes", size
    free = host_memory_available()
    visits = args.steps * args.grad_accum * args.batch_size
    return visits > len(answers) and free is not None and size <= free / 2, size


@contextlib.contextmanager
def checkpointing(model, on=True):
    """--gradient-checkpointing: transformers recomputes each decoder layer in the backward pass,
    and only in train mode (Qwen2.5-VL has no dropout: train mode changes nothing else)."""
    if not on:
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.eval()


def frugal_host_memory():
    """Ours: glibc serves large blocks by mmap and returns them when freed, but each time one is
    freed it raises that threshold (up to 32 MiB); from then on tensors come from the heap, whose
    freed blocks stay resident (1.1 GiB after the SVD stage at Qwen2.5-0.5B's size). Fixing the
    threshold at 256 KiB keeps every larger tensor in its own mapping, returned when freed."""
    try:
        ctypes.CDLL(None).mallopt(-3, 256 * 1024)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass


def peak_memory():
    """Peak resident memory of this process (and of the GPU). Linux's VmHWM, where there is one:
    ru_maxrss survives exec, so it would count the memory of whatever process launched us."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory = {"peak_rss_gib": kib / 2 ** 20}
    if torch.cuda.is_available():
        memory["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return memory


# ---- choosing lambda before training: the label-free scan (--scan) ---------------------------

@torch.no_grad()
def lambda_scan(model, processor, gated, answers, lams, batch_size):
    """Ours: Eq. 8 with every gate open at each lambda, i.e. Task Arithmetic's KL to the VLM on
    the teacher's own answers, token mean over the whole set: [{"lam", "kl", "rise"}]."""
    for layer in gated.values():
        layer.g.fill_(math.inf)
    sums, tokens = [0.0] * len(lams), 0
    for i in tqdm(range(0, len(answers), batch_size), desc="Lambda scan"):
        batch, mask = make_batch(processor, answers[i:i + batch_size], model.device)
        with deltas_off(gated):
            teacher = F.log_softmax(answer_logits(model, batch, mask), dim=-1)
        n = int(mask.sum())
        for k, lam in enumerate(lams):
            for layer in gated.values():
                layer.lam = lam
            sums[k] += distill_loss(model, gated, batch, mask, teacher).item() * n
        tokens += n
    table, previous = [], None
    for lam, total in sorted(zip(lams, sums)):
        kl = total / tokens
        table.append({"lam": lam, "kl": kl, "rise": None if previous is None else kl - previous})
        previous = kl
    return table


def print_scan(table):
    print("\nLambda scan: Task Arithmetic's KL to the VLM on the calibration answers (Eq. 8)")
    print(f"{'lambda':>8s} {'KL':>10s} {'rise':>10s}")
    for row in table:
        rise = "" if row["rise"] is None else f"{row['rise']:+.4f}"
        print(f"{row['lam']:8g} {row['kl']:10.4f} {rise:>10s}")
    print("Choose --lam about twice the largest lambda before the KL rises steeply: FRISM's gates "
          "start at half (Task Arithmetic at lam / 2) and can open up to lam.")


# ---- --dry-run: will it fit? A memory plan from the configs alone, before any download -------

def counted_parameters(cfg):
    """The VLM's exact parameter count for any architecture, from its config alone: the model is
    built on the meta device (no memory, no weights) and counted."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForImageTextToText.from_config(cfg)
        except ValueError:  # not an image-text-to-text class
            model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def parameter_count(name, cfg):
    """From local safetensors headers or the hub's metadata; else counted from the config."""
    from safetensors import safe_open
    if os.path.isdir(name):
        files = [f for f in os.listdir(name) if f.endswith(".safetensors")]
        if files:
            count = 0
            for file in files:
                with safe_open(os.path.join(name, file), "pt") as f:
                    count += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            return count, "safetensors headers"
        return counted_parameters(cfg), "counted from config.json"
    try:
        from huggingface_hub import get_safetensors_metadata
        return sum(get_safetensors_metadata(name).parameter_count.values()), "hub metadata"
    except Exception:
        return counted_parameters(cfg), "counted from config.json"


def memory_plan(cfg, parameters, args, device_gib):
    """Bytes of everything a run holds at its peak, and the largest --rank that fits (ours: an
    estimate; activations are those the backward pass to the gates keeps, per token and layer)."""
    t = language_config(cfg)
    b = torch.finfo(getattr(torch, args.dtype)).bits // 8
    shapes = list(expected_shapes(t).values())
    tokens = args.batch_size * (args.max_pixels // (28 * 28) + 64 + args.max_new_tokens)
    layers, h, i = t.num_hidden_layers, t.hidden_size, t.intermediate_size

    def plan(rank):
        r = [min(rank or min(s), min(s)) for s in shapes]
        factors = sum(k * (d_out + d_in) * b + 2 * k * 4 for (d_out, d_in), k in zip(shapes, r))
        one_layer = 12 * h + 3 * i + 2 * sum(r) / layers  # what a layer keeps for its backward
        per_token = b * (layers * h + one_layer if args.gradient_checkpointing else
                         layers * one_layer)
        logits = args.batch_size * args.max_new_tokens * t.vocab_size * 4 * 4
        items = {"VLM weights": parameters * b, "frozen factors U, S, Vh": factors,
                 "gates, gradients, AdamW state": sum(r) * 4 * 4,
                 "activations (estimate)": tokens * per_token + logits,
                 "SVD workspace (transient)": 3 * max(o * n for o, n in shapes) * 4}
        return items, sum(items.values()) / 2 ** 30

    items, total = plan(args.rank)
    fitting = None
    if device_gib and total > device_gib:
        top = max(min(s) for s in shapes)
        fitting = next((k for k in range(top - top % 64, 0, -64) if plan(k)[1] <= device_gib),
                       None)
    return {"items": {k: v / 2 ** 30 for k, v in items.items()}, "total_gib": total,
            "device_gib": device_gib, "tokens": tokens,
            "fits": None if not device_gib else total <= device_gib, "rank_that_fits": fitting}


def dry_run(args):
    """Check the three configs and print the memory plan; no weight is downloaded or loaded."""
    configs = {}
    for flag in ("vlm", "lrm", "base"):
        check_model_name(getattr(args, flag), f"--{flag}")
        configs[flag] = load_config(getattr(args, flag), f"--{flag}")
    check_configs(language_config(configs["vlm"]), {"--lrm": language_config(configs["lrm"]),
                                                    "--base": language_config(configs["base"])})
    parameters, source = parameter_count(args.vlm, configs["vlm"])
    device_gib = args.device_memory or (torch.cuda.get_device_properties(0).total_memory / 2 ** 30
                                        if args.device.startswith("cuda") and
                                        torch.cuda.is_available() else None)
    plan = memory_plan(configs["vlm"], parameters, args, device_gib)
    if plan["fits"] is False and not args.gradient_checkpointing:
        plan["checkpointing_fits"] = memory_plan(configs["vlm"], parameters, argparse.Namespace(
            **dict(vars(args), gradient_checkpointing=True)), device_gib)["fits"]
    print(f"FRISM memory plan: {args.dtype}, rank {args.rank or 'all'}, batch {args.batch_size}, "
          f"{plan['tokens'] // args.batch_size} tokens a sample, VLM parameters {source}")
    for item, gib in plan["items"].items():
        print(f"  {item:32s} {gib:8.2f} GiB")
    print(f"  {'total':32s} {plan['total_gib']:8.2f} GiB")
    if plan["fits"] is not None:
        verdict = "fits" if plan["fits"] else "does NOT fit" + (
            f"; --rank {plan['rank_that_fits']} fits" if plan["rank_that_fits"] else
            "; no --rank makes it fit") + (
            "; --gradient-checkpointing fits" if plan.get("checkpointing_fits") else "")
        print(f"  device memory {plan['device_gib']:.1f} GiB: {verdict}")
    cache = args.num_samples * args.max_new_tokens * language_config(configs["vlm"]).vocab_size * 4
    print(f"  host memory for the teacher cache: at most {cache / 2 ** 30:.2f} GiB "
          f"(--cache-teacher auto uses it when it fits)")
    return plan


# ---- saving: atomic, with the report and a model card; no staging directory left behind ------

def staging_prefix(out, kind):
    """".NAME.partial-PID@HOST-": whose staging directory it is, so that a later run can tell a
    live run's from one left by a process that was killed (SIGKILL, the OOM killer)."""
    import socket
    return f".{os.path.basename(out)}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def remove_stale_staging(out, prog):
    """Remove the staging directories of --out that a dead process on this host left behind (a
    replaced output found there, with no --out in its place, is put back); say so in one line."""
    import socket
    out = os.path.abspath(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    pattern = re.compile(r"\.%s\.(partial|replaced)-(\d+)@(.+)-[a-z0-9_]+$" % re.escape(name))
    removed = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m = pattern.fullmatch(entry)
        if not m or m.group(3) != socket.gethostname() or process_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "replaced" and os.path.isdir(os.path.join(path, name)) \
                and not os.path.exists(out):
            os.replace(os.path.join(path, name), out)  # the previous output, never lost
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(f"{entry} ({size / 2 ** 30:.2f} GiB)")
    if removed:
        print(f"{prog}: removed {len(removed)} staging director{'y' if len(removed) == 1 else 'ies'}"
              f" left beside --out by a killed run: {', '.join(removed)}.", file=sys.stderr)
    return removed


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def save(model, processor, out, dtype, extra, overwrite=False):
    """Write the model, its processor and `extra` ({file name: writer(path)}) into a hidden
    sibling directory, then rename it into place: an interrupted run (Ctrl-C, a full disk)
    leaves neither a complete-looking model nor a hidden partial directory behind, and one
    killed outright leaves a directory the next run removes. A replaced --out is moved aside
    first and deleted only once the new one is in place."""
    out = os.path.abspath(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    tmp = old = None
    try:
        tmp = tempfile.mkdtemp(prefix=staging_prefix(out, "partial"), dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the model private
        if model is not None:
            model.to(dtype).save_pretrained(tmp)  # the input checkpoint's dtype and tensor names
            processor.save_pretrained(tmp)
        for file, write in extra.items():
            write(os.path.join(tmp, file))
        if os.path.exists(out):  # empty, or --overwrite was given
            old = tempfile.mkdtemp(prefix=staging_prefix(out, "replaced"), dir=parent)
            os.replace(out, os.path.join(old, name))
        os.replace(tmp, out)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not os.path.exists(out):  # put the old output back
                os.replace(os.path.join(old, name), out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(report):
    def write(path):
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return write


def write_tensors(tensors):
    from safetensors.torch import save_file
    return lambda path: save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()},
                                  path)


def model_card(vlm, lrm, base, tag, method, settings, figures, command):
    """README.md of a merged checkpoint: the front matter the Hub reads (base models, tags,
    library, pipeline) and how the model was made. The input checkpoint's card is not copied."""
    from huggingface_hub import ModelCard, ModelCardData
    data = ModelCardData(base_model=[vlm, lrm], tags=["merge", tag], library_name="transformers",
                         pipeline_tag="image-text-to-text")
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    body = (f"# {tag}: {os.path.basename(vlm.rstrip('/'))} + {os.path.basename(lrm.rstrip('/'))}\n\n"
            f"The VLM `{vlm}` with the reasoning of the text-only model `{lrm}` merged into its "
            f"language model (task vector = `{lrm}` minus `{base}`); the vision tower and every "
            f"other tensor are the VLM's. Method: {method}\n\n"
            f"## How it was made\n\n```\n{command}\n```\n\n| setting | value |\n|---|---|\n{rows}\n\n"
            f"## What the merge did\n\n" + "\n".join(f"- {line}" for line in figures) +
            "\n\n## Versions\n\n" + ", ".join(f"{k} {v}" for k, v in versions().items()) + "\n")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    return lambda path: card.save(path)


FRISM_PAPER = ("FRISM, subspace-level merging with one learned gate per singular direction of "
               "each layer's task vector (Huang et al., \"FRISM: Fine-Grained Reasoning Injection "
               "via Subspace-Level Model Merging for Vision-Language Models\", arXiv 2601.21187, "
               "ICML 2026).")


def frism_card(args, command, stats, history):
    split = "" if args.data.endswith(".jsonl") else f" (split {args.data_split})"
    settings = {"lambda (--lam)": args.lam, "alpha (--alpha)": args.alpha,
                "gate start (--gate-init)": args.gate_init,
                "steps": 0 if args.no_train else args.steps,
                "directions": f"{args.band[0]}-{args.band[1]}" if args.band else
                f"top {args.rank}" if args.rank else "all",
                "calibration data": "none (--no-train)" if args.no_train else
                f"{args.data}{split}, at most {args.num_samples} questions"}
    if args.no_train:
        figures = [f"Task Arithmetic: every gate open, W = W_vlm + {args.lam} * tau"
                   + (f" (top {args.rank} directions)" if args.rank else "")
                   + (f" (directions {args.band[0]}-{args.band[1]} only)" if args.band else "")
                   + "."]
    else:
        ranks = sum(s["rank"] for s in stats.values())
        mean = sum(s["mean"] * s["rank"] for s in stats.values() if s["rank"]) / ranks
        open_ = sum(s["open"] * s["rank"] for s in stats.values() if s["rank"]) / ranks
        figures = [f"{len(stats)} gated layers, {ranks} gates: mean sigmoid(g) {mean:.3f}, "
                   f"{100 * open_:.1f} % above 0.5 (all start at "
                   f"{torch.sigmoid(torch.tensor(args.gate_init)).item():.2f}).",
                   f"Injected spectral energy at the end of training: {history[-1]['injected']:.3f} "
                   f"of the task vectors' (final KL to the VLM {history[-1]['kl']:.4f})."]
    return model_card(args.vlm, args.lrm, args.base, "frism", FRISM_PAPER, settings, figures,
                      command)


def gate_statistics(gated):
    stats = {}
    for path, layer in gated.items():
        s, S = torch.sigmoid(layer.g.detach()), layer.S
        if len(s) == 0:  # a --band beyond this layer's rank
            stats[path] = {"rank": 0}
            continue
        stats[path] = {"rank": len(s), "mean": s.mean().item(), "min": s.min().item(),
                       "max": s.max().item(), "open": (s > 0.5).float().mean().item(),
                       "injected": ((s * S) ** 2).sum().item() / (S ** 2).sum().item()}
    return stats


def checkpoint_dtype(path, default):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else default


def versions():
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__}


# ---- the run, top to bottom ------------------------------------------------------------------

class Laps:
    """Seconds and peak memory after each stage: where the peak rises is where memory goes."""

    def __init__(self):
        self.seconds, self.peaks, self.t = {}, {}, time.perf_counter()

    def __call__(self, stage):
        self.seconds[stage] = round(time.perf_counter() - self.t, 3)
        self.peaks[stage] = peak_memory()
        self.t = time.perf_counter()


def run(args, command="", make_objective=None):
    """Check, load, merge (Task Arithmetic, FRISM, or the scan), save; returns the report.
    make_objective(model, processor, gated) -> objective replaces Eq. 10 (toy.py's oracle)."""
    lap = Laps()
    check_numbers(args)
    if args.dry_run:
        return {"plan": dry_run(args)}
    if not args.out and not args.scan:
        raise InputError("--out is required (where the merged model goes).")
    if args.out:
        remove_stale_staging(args.out, "frism.py")
    vlm, lrm_index, base_index = check_inputs(args.vlm, args.lrm, args.base, args.out,
                                              args.overwrite)
    samples = None if args.no_train and not args.scan else load_calibration(args)
    lap("check")
    frugal_host_memory()
    model, processor = load_vlm(vlm, args.dtype, args.device, args.device_map)
    lap("load")
    if args.no_train and kept_directions(args) == slice(None) and not args.scan:  # no SVD
        layers = task_arithmetic(model, lrm_index, base_index, args.lam)
        trained = {f"{path}.g": torch.full((min(m.weight.shape),), math.inf)
                   for path, m in layers.values()}
        report = {"gates": {}, "loss_curve": []}  # no subspaces were formed
        lap("task_arithmetic")
    else:
        trained, report = subspace_merge(model, processor, lrm_index, base_index, samples, args,
                                         lap, make_objective)
    report = {"args": vars(args), "command": command, "versions": versions(),
              "seconds": lap.seconds, "memory": dict(peak_memory(), after_stage=lap.peaks),
              "calibration": {"questions": len(samples or []), "answers": 0,
                              "teacher_cached": False}, **report}
    if args.scan:
        if args.out:  # the table alone: no model is written
            save(None, None, args.out, None, {"frism_report.json": write_json(report)},
                 args.overwrite)
        return report
    save(model, processor, args.out, checkpoint_dtype(vlm, model.dtype),
         {"frism_gates.safetensors": write_tensors(trained),
          "frism_report.json": write_json(report),
          "README.md": frism_card(args, command, report["gates"], report["loss_curve"])},
         args.overwrite)
    return report


def subspace_merge(model, processor, lrm_index, base_index, samples, args, lap, make_objective):
    """Stage 1 and Eq. 7, then Eq. 8-10 (or every gate open, or the scan), then the fold:
    (the trained parameters, what the report says of them)."""
    gated = inject(model, lrm_index, base_index, args)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the SVD workspaces back before training starts
    lap("svd")
    report = {"loss_curve": []}
    if not args.no_train or args.scan:
        answers, caching = prepare_teacher(model, processor, gated, samples, args)
        report["calibration"] = {"questions": len(samples), "answers": len(answers),
                                 "teacher_cached": caching}
        lap("teacher")
    if args.scan:
        report["scan"] = lambda_scan(model, processor, gated, answers, args.scan, args.batch_size)
        print_scan(report["scan"])
        lap("scan")
        return {}, report
    if args.no_train:
        for layer in gated.values():
            layer.g.data.fill_(math.inf)  # every kept gate fully open
    else:
        objective = make_objective(model, processor, gated) if make_objective else None
        report["loss_curve"] = train(model, processor, gated, answers, args, objective)
        lap("train")
    trained, report["gates"] = trained_parameters(gated), gate_statistics(gated)
    fold(model, gated)
    lap("fold")
    return trained, report


def prepare_teacher(model, processor, gated, samples, args):
    """The teacher's answers, and its log-probs cached once where --cache-teacher says so."""
    answers = teacher_answers(model, processor, gated, samples, args)
    if not answers:
        raise InputError("the VLM gave an empty answer to every calibration question; "
                         "check --data and --max-new-tokens.")
    if args.scan:
        return answers, False
    caching, size = teacher_cache_decision(
        answers, model.get_output_embeddings().weight.shape[0], args)
    print(f"Teacher log-probs: {'cached once' if caching else 'recomputed every step'} "
          f"(a cache takes {size / 2 ** 30:.2f} GiB of host memory; --cache-teacher "
          f"{args.cache_teacher})")
    if caching:
        answers = cache_teacher(model, processor, gated, answers, args)
    return answers, caching


def interrupted_by_sigterm(signum, frame):
    raise KeyboardInterrupt  # a killed job cleans up as Ctrl-C does


def guarded(prog, out, work):
    """(exit code, result of work()): bad input, an interrupt or a failed write ends in one
    line on stderr, never a traceback, and (see save) never in a half-written output."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupted_by_sigterm)
    try:
        return 0, work()
    except (InputError, FloatingPointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return (2 if isinstance(e, InputError) else 1), None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written to {out!r}.", file=sys.stderr)
        return 130, None
    except OSError as e:  # a full disk, a read-only directory
        print(f"{prog}: error: {e}; nothing was written to {out!r}.", file=sys.stderr)
        return 1, None


def command_line(prog, argv):
    return shlex.join(["python", prog, *(sys.argv[1:] if argv is None else argv)])


def main(argv=None, make_objective=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    code, report = guarded("frism.py", args.out, lambda: run(
        args, command_line("frism.py", argv), make_objective))
    if code == 0 and not args.dry_run and not args.scan:
        print(f"Merged model written to {args.out} ({sum(report['seconds'].values()):.1f} s; "
              f"peak RSS {peak_memory()['peak_rss_gib']:.2f} GiB).")
    return code


if __name__ == "__main__":
    sys.exit(main())
