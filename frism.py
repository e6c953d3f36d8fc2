"""FRISM: Fine-grained Reasoning Injection via Subspace-level Model merging (arXiv 2601.21187).

The paper, and where each part of it is in this file, in the order the file reads:

  Stage 1  tau = theta_lrm - theta_base for each merged linear layer      task_vectors
           tau = U diag(S) Vh, thin SVD, U, S, Vh frozen                  decompose
  Eq. 7    W = W_vlm + lam * U diag(sigmoid(g) * S) Vh, one gate a        GatedLinear
           singular direction, g = 0; every merged layer wrapped          inject
  Eq. 8    L_distill = KL(p_vlm || p_merged) on perception data, with     teacher_answers,
           the teacher = the VLM (every delta off), no labels             distill_loss
  Eq. 9    L_inject = - sum_l ||sigmoid(g^l) * S^l||^2, normalised        inject_loss
  Eq. 10   L = L_distill + alpha * L_inject, a function of one training   eq10 (Step, and
           step; other objectives sit beside it in one table              OBJECTIVES)
           (ours: a text stream the LRM answers, for the dual objective)  lrm_answers, dual
           only the gates are trained                                     train
           Eq. 7 evaluated once: a plain nn.Linear again                  fold
           every step above, in order (the text stream's answers, made    subspace_merge
           before the VLM loads, come to it ready)

A reader who stops at the banner "The program around the method" has read every step of FRISM,
and the two speed options of its training loop (a cache of the teacher's log-probs, gradient
checkpointing), which change no result. Below the banner: Task Arithmetic (--no-train), command
line, input checks, calibration data, the text stream (its prompts, checks and the LRM's turn),
the lambda scan, speed and memory, the dry-run memory plan, saving (model card included), the run,
signals and main. Lines marked "ours" implement a choice the paper leaves open; docs/choices.md
lists them all.

    python frism.py --vlm Qwen/Qwen2.5-VL-7B-Instruct \\
                    --lrm deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --base Qwen/Qwen2.5-Math-7B \\
                    --out merged/
"""
import argparse
import contextlib
import ctypes
import dataclasses
import functools
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
from typing import Callable, NamedTuple

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


class InputError(Exception):
    """A problem with what the user asked for: the program reports it as one sentence, exit 2."""


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


def kept_directions(args):
    """All singular directions (the paper), the top k (--rank k), or a band (--band FIRST LAST)."""
    if getattr(args, "band", None):
        return slice(args.band[0] - 1, args.band[1])
    return slice(None, args.rank)


def decompose(tau, keep, device):
    """tau = U diag(S) Vh, singular values descending; `keep` (a slice) picks the directions
    kept: all as in the paper, the top k with --rank, a band with --band."""
    U, S, Vh = torch.linalg.svd(tau.to(device), full_matrices=False)
    if keep != slice(None):  # copies, so that the dropped directions' memory is freed
        U, S, Vh = U[:, keep].clone(), S[keep].clone(), Vh[keep].clone()
    return U, S, Vh


# ---- Eq. 7: the gated layer, W = W_vlm + lam * U diag(sigmoid(g) * S) Vh ----------------------

class GatedLinear(nn.Module):
    """A VLM linear layer, frozen here, plus the LRM's task vector with one sigmoid gate per
    subspace. Every parameter this module adds (FRISM: g; a fork may add its own) is trained and
    saved; the wrapped layer's own never are, whoever built the model."""

    def __init__(self, base, U, S, Vh, lam, gate_init=0.0):
        super().__init__()
        self.base, self.lam, self.delta_on = base.requires_grad_(False), lam, True
        dtype = base.weight.dtype  # ours: U, Vh in the working dtype; S and g in fp32
        self.register_buffer("U", U.to(dtype), persistent=False)
        self.register_buffer("Vh", Vh.to(dtype), persistent=False)
        self.register_buffer("S", S.float(), persistent=False)
        self.g = nn.Parameter(torch.full_like(self.S, gate_init))  # paper: g = 0

    def effective_S(self):
        return torch.sigmoid(self.g) * self.S  # S_eff of Eq. 7

    @torch.no_grad()
    def gates(self):
        """The gate of every direction as this layer defines it, S_eff / S (FRISM: sigmoid(g)):
        every figure of "the gates" reads this, whatever parameters a fork adds. A direction
        with S = 0 injects nothing; its gate reads 0."""
        return self.effective_S() / self.S.clamp_min(torch.finfo(torch.float32).tiny)

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
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the SVD workspaces back before training starts
    return gated


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


# ---- the teacher's answers: where Eq. 8 is measured -------------------------------------------

class Answer(NamedTuple):
    """One question and its teacher's answer (token ids): a calibration question with the VLM's
    answer, end of turn included; or a text prompt (image None) with the LRM's, which ends before
    its end of turn (lrm_answers)."""
    image: object
    question: str
    ids: list


def chat_prompt(processor, question, image=True):
    """The VLM's own chat template around one question, with its image or (text stream) none."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
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
    if not answers:  # the one input fault that only shows here: nothing to measure Eq. 8 on
        raise InputError("the VLM gave an empty answer to every calibration question; check "
                         "--data and --max-new-tokens.")
    return answers


# ---- Eq. 8: vision preservation, KL(p_vlm || p_merged) at the answer positions ---------------

def make_batch(processor, items, device):
    """Prompt + answer per item, right-padded. One processor call over the whole batch, one
    image list per sample, so tiles, crops and image-token counts are the processor's business
    whatever the model family; items without an image (the text stream) get the VLM's chat
    template and no image."""
    image = items[0].image is not None
    prompts = processor(text=[chat_prompt(processor, item.question, image) for item in items],
                        images=[[item.image] for item in items] if image else None,
                        padding=True, padding_side="right", return_tensors="pt")
    return with_answers(prompts, items, processor.tokenizer.pad_token_id, device)


def with_answers(prompts, items, pad, device):
    """Each item's answer written after its tokenised prompt. mask[b, t] is True where the token
    at t+1 is an answer token: the logits at t predict it."""
    lengths = prompts["attention_mask"].sum(1).tolist()
    answers = [item.ids for item in items]
    length = max(n + len(a) for n, a in zip(lengths, answers))
    per_token = [k for k, v in prompts.items() if v.shape == prompts["input_ids"].shape]
    batch = dict(prompts)
    for k in per_token:  # input_ids, attention_mask and any per-token type ids
        v = prompts[k]
        batch[k] = torch.full((len(items), length), pad if k == "input_ids" else 0, dtype=v.dtype)
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


def answer_logp(model, batch, mask):
    """log p at the answer positions, over the full vocabulary, in fp32 (ours)."""
    return F.log_softmax(answer_logits(model, batch, mask), dim=-1)


def distill_loss(student_logp, teacher_logp):
    """Eq. 8: KL(p_vlm || p_merged) per answer token over the full vocabulary, temperature 1,
    token mean (ours)."""
    return F.kl_div(student_logp, teacher_logp.to(student_logp.device), log_target=True,
                    reduction="batchmean")


# ---- Eq. 9: reasoning absorption, the injected spectral energy --------------------------------

def inject_loss(gated):
    """Eq. 9, normalised by sum_l ||S^l||^2 (ours, after the paper's Appendix H): in (-1, 0).
    Directions that carry no energy inject none: 0, never 0 / 0."""
    device = next(iter(gated.values())).S.device  # with --device-map the layers are spread
    energy = sum((layer.effective_S() ** 2).sum().to(device) for layer in gated.values())
    total = sum((layer.S ** 2).sum().to(device) for layer in gated.values())
    return -energy / total.clamp_min(torch.finfo(torch.float32).tiny)


# ---- one training step, as an objective sees it -----------------------------------------------

@dataclasses.dataclass
class Step:
    """One micro-batch of training. An objective reads what it needs and returns its terms."""
    student_logp: torch.Tensor  # log p_merged at the answer positions (tokens x vocab, fp32)
    items: list  # the Answer items of the batch
    batch: dict  # the processor's tensors, prompt + answer, right-padded
    mask: torch.Tensor  # True where the next token is an answer token
    gated: dict  # {module path: GatedLinear}
    args: argparse.Namespace  # the settings (alpha, lam, ...)
    read_teacher: Callable  # () -> log p_vlm at the same positions
    read_text: Callable = None  # () -> (log p_merged, the LRM's Top) on the text stream

    @functools.cached_property
    def teacher_logp(self):
        """log p_vlm at the answer positions: computed (or read from the cache) on first use
        only, so an objective that never reads it costs no teacher pass."""
        return self.read_teacher()

    @functools.cached_property
    def text(self):
        """(log p_merged, p_lrm as a Top) at the answer positions of one micro-batch of the text
        stream (the LRM's answers to text prompts, lrm_answers below, read with the VLM's chat
        template and no image): computed on first use only. The run has a text stream only for a
        row of OBJECTIVES with text=True."""
        if self.read_text is None:
            raise RuntimeError("this objective reads the text stream (Step.text), which only a "
                               "row of OBJECTIVES with text=True, given as --objective, has")
        return self.read_text()


# ---- Eq. 10, and the objectives beside it: each a function of one step ------------------------

def eq10(step):
    """FRISM's objective. Returns the loss and every term it is made of, by name (the progress
    bar, the history and the report show them)."""
    kl = distill_loss(step.student_logp, step.teacher_logp)  # Eq. 8
    L_inject = inject_loss(step.gated)  # Eq. 9
    return {"loss": kl + step.args.alpha * L_inject,  # Eq. 10
            "kl": kl, "injected": -L_inject}


def entropy(step):
    """Not FRISM's: the mean entropy of the merged model's next-token distribution at the answer
    positions, plus alpha * Eq. 9. AdaRank (Lee et al., ICLR 2026) minimises prediction entropy on
    unlabelled inputs; this is that objective on FRISM's gates, which act on the LRM's singular
    directions only (AdaRank masks those of every task vector, with hard masks). It never reads
    the teacher: training runs no teacher pass."""
    logp = step.student_logp
    H = -(logp.exp() * logp).sum(-1).mean()
    L_inject = inject_loss(step.gated)  # Eq. 9
    return {"loss": H + step.args.alpha * L_inject, "entropy": H, "injected": -L_inject}


class Top(NamedTuple):
    """A next-token distribution kept small (ours): its k most likely tokens' ids and log-probs,
    and the log-probability of all the other tokens together; one row per answer position."""
    ids: torch.Tensor  # (positions, k), int64
    logp: torch.Tensor  # (positions, k), fp32
    rest: torch.Tensor  # (positions,), fp32


def top(logp, k):
    """The Top of full log-probs (positions x vocabulary), k < vocabulary."""
    values, ids = logp.topk(k, dim=-1)
    return Top(ids, values, logp.scatter(-1, ids, -math.inf).logsumexp(-1))


def text_kl(student_logp, lrm):
    """KL(p_lrm || p_merged) at the text stream's answer positions, token mean, over the LRM's top
    k tokens and one outcome for every other token (ours: the LRM's whole distribution over a long
    answer does not fit in memory). It is the KL of both distributions coarsened to those k + 1
    outcomes: never above the full KL, and equal to it where the top k hold all of p_lrm."""
    top_q = student_logp.gather(-1, lrm.ids)
    rest_q = student_logp.scatter(-1, lrm.ids, -math.inf).logsumexp(-1)
    kl = (lrm.logp.exp() * (lrm.logp - top_q)).sum(-1) + lrm.rest.exp() * (lrm.rest - rest_q)
    return kl.mean()


def dual(step):
    """Not FRISM's: Eq. 10 plus beta times the KL from the LRM to the merged model on the text
    stream, KL(p_lrm || p_merged) at the LRM's own answers to unlabelled reasoning prompts. Two
    teachers, no label: the VLM keeps perception (Eq. 8), the LRM shows what its task vector is
    for. Ours: each model reads the prompt in its own chat template, the format it was trained
    on, and the answer after it. At beta 0 its loss is Eq. 10's (the LRM still answers, and the
    text stream is still read)."""
    kl = distill_loss(step.student_logp, step.teacher_logp)  # Eq. 8
    kl_text = text_kl(*step.text)  # the same KL, taken to the LRM on the text stream
    L_inject = inject_loss(step.gated)  # Eq. 9
    return {"loss": kl + step.args.beta * kl_text + step.args.alpha * L_inject,
            "kl": kl, "kl_text": kl_text, "injected": -L_inject}


class Objective(NamedTuple):
    function: Callable  # Step -> {"loss": tensor, other terms by name}
    description: str
    source: str
    text: bool = False  # reads the text stream (Step.text): the LRM answers --text-data first


# --objective reads this table: a new objective is one function above and one row here.
OBJECTIVES = {
    "eq10": Objective(eq10, "KL to the VLM at the teacher's answers + alpha x Eq. 9 (Eq. 10)",
                      "FRISM, Huang et al., ICML 2026"),
    "entropy": Objective(entropy, "entropy of the merged model at the teacher's answer positions "
                         "+ alpha x Eq. 9; no teacher pass", "ours, after AdaRank (Lee et al., "
                         "ICLR 2026), which minimises prediction entropy on unlabelled inputs"),
    "dual": Objective(dual, "Eq. 10 + beta x KL from the LRM to the merged model on the LRM's "
                      "answers to --text-data prompts (text only)", "ours: two teachers, the VLM "
                      "on perception and the LRM on reasoning text", text=True),
}


# ---- the LRM's answers on a text stream: ours, for objectives that read it (dual) -----------

TEXT_TOP_K = 64  # ours: the LRM's next-token distributions kept as their 64 likeliest tokens


class TextStream(NamedTuple):
    """The text stream an objective reads (ours): the LRM's answers to unlabelled prompts
    (Answer items, no image) and, for each, its next-token distribution at every answer position
    as a Top; `cut`: how many answers --text-max-new-tokens cut."""
    items: list
    lrm: list
    cut: int

    def target(self, indices, device):
        """p_lrm at every answer position of the items at `indices`, as one Top."""
        return Top(*(torch.cat(part).to(device) for part in zip(*(self.lrm[i] for i in indices))))


@torch.no_grad()
def lrm_answers(lrm, tokenizer, prompts, unreadable, args):
    """Ours: before training, the LRM answers each unlabelled text prompt once, greedily, with its
    own chat template and --text-max-new-tokens, and its next-token distributions at its answer
    positions are taken once: the LRM is released before the VLM loads, so they are kept (host
    memory, TEXT_TOP_K tokens a position). An answer ends before the LRM's end-of-turn token,
    which need not be the VLM's (R1-Distill ends a turn with another token than Qwen2.5-VL); empty
    answers are dropped. `unreadable`: token ids the VLM reads as other tokens
    (check_text_stream): those that open an answer (an R1 model's `<think>`, where its template
    does not write it) stay in the LRM's context but are not part of the answer, and the first one
    after them ends it (its `</think>`)."""
    stop = end_of_turn_ids(lrm, tokenizer) | set(unreadable)
    k = min(TEXT_TOP_K, lrm.get_output_embeddings().weight.shape[0] - 1)

    def template(question):  # the LRM's own chat format, text only
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    items, kept, cut = [], [], 0
    for i in tqdm(range(0, len(prompts), args.batch_size), desc="LRM answers (text stream)"):
        chunk = prompts[i:i + args.batch_size]
        inputs = tokenizer([template(q) for q in chunk], padding=True, padding_side="left",
                           return_tensors="pt", add_special_tokens=False).to(lrm.device)
        out = lrm.generate(**inputs, max_new_tokens=args.text_max_new_tokens, do_sample=False)
        # first: how many unreadable tokens open an answer (an R1 model's <think>). They stay in the
        # LRM's context when its log-probs are taken below, and are cut from what the merged
        # model reads. Unlike the teacher's answers, these end before the end of turn: the LRM's
        # end-of-turn token need not be one the VLM has.
        answered, opened = [], []  # the answers, and the unreadable tokens that open each
        for question, ids in zip(chunk, out[:, inputs["input_ids"].shape[1]:].tolist()):
            first = next((n for n, t in enumerate(ids) if t not in unreadable), len(ids))
            ends = [n for n, t in enumerate(ids) if n >= first and t in stop]
            cut += not ends
            ids = ids[:ends[0]] if ends else ids  # cut by the limit: kept as it is
            if ids[first:]:
                answered.append(Answer(None, question, ids))
                opened.append(first)
        if not answered:
            continue
        prompted = tokenizer([template(item.question) for item in answered], padding=True,
                             padding_side="right", return_tensors="pt", add_special_tokens=False)
        batch, mask = with_answers(prompted, answered, tokenizer.pad_token_id, lrm.device)
        rows, start = top(answer_logp(lrm, batch, mask), k), 0
        for item, first in zip(answered, opened):  # each answer's rows, the opening ones left out
            kept.append(Top(*(part[start + first:start + len(item.ids)].cpu() for part in rows)))
            items.append(item._replace(ids=item.ids[first:]))
            start += len(item.ids)
    if not items:
        raise InputError("the LRM gave an empty answer to every --text-data prompt; check "
                         "--text-data and --text-max-new-tokens.")
    return TextStream(items, kept, cut)


# ---- the training loop: label-free self-distillation -----------------------------------------

def trained_parameters(gated):
    """Every parameter the gated layers add (FRISM: the gates g); the VLM's own stay frozen."""
    return {f"{path}.{name}": p for path, layer in gated.items()
            for name, p in layer.named_parameters()
            if p.requires_grad and not name.startswith("base.")}


def batches(n, size, seed):
    """Indices of a data set (the calibration set, the text stream), shuffled and cycled for as
    long as training asks (ours)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, size):
            yield order[i:i + size]


def mean_gate(gated):
    """What the progress bar shows: the mean gate (S_eff / S) over every direction."""
    return torch.cat([layer.gates().flatten().cpu() for layer in gated.values()]).mean().item()


# Two speed options of the loop; neither changes the objective or the result: a cache of the
# teacher's log-probs (which --cache-teacher auto takes where the host's free memory holds it) and
# gradient checkpointing.

def host_memory_available():
    """Bytes the OS could give us now (Linux's MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def teacher_cache_decision(answers, vocab_size, args):
    """Ours, for --cache-teacher auto: cache when the steps would run the teacher on more answers
    than there are (so caching saves passes) and the cache takes at most half the free host memory.
    Returns (cache?, bytes the cache takes)."""
    size = sum(len(answer.ids) for answer in answers) * vocab_size * 4
    if args.cache_teacher != "auto":
        return args.cache_teacher == "yes", size
    free = host_memory_available()
    visits = args.steps * args.grad_accum * args.batch_size
    return visits > len(answers) and free is not None and size <= free / 2, size


class Teacher:
    """p_vlm of Eq. 8: the merged model with every delta off, at the answer positions, no grad.
    It never changes, so where --cache-teacher says (ours, for speed) every answer's log-probs
    are computed once, the first time an objective reads them, and kept in host memory (fp32)."""

    def __init__(self, model, processor, gated, answers, args):
        self.model, self.processor, self.gated, self.answers = model, processor, gated, answers
        self.args, self.kept, self.passes, self.read = args, None, 0, False
        self.cache, self.cache_bytes = teacher_cache_decision(
            answers, model.get_output_embeddings().weight.shape[0], args)

    @torch.no_grad()
    def logp(self, batch, mask):
        self.passes += 1
        with deltas_off(self.gated):
            return answer_logp(self.model, batch, mask)

    def every_answer(self):
        kept, size = [], self.args.batch_size
        for i in tqdm(range(0, len(self.answers), size), desc="Caching teacher log-probs"):
            chunk = self.answers[i:i + size]
            logp = self.logp(*make_batch(self.processor, chunk, self.model.device)).cpu()
            kept += logp.split([len(item.ids) for item in chunk])
        return kept

    def __call__(self, indices, batch, mask):
        """log p_vlm for the answers at `indices`, which `batch` and `mask` hold."""
        if not self.read:  # the first read: say what the cache decision was, and act on it
            self.read = True
            print(f"Teacher log-probs: {'cached once' if self.cache else 'recomputed every step'} "
                  f"(a cache takes {self.cache_bytes / 2 ** 30:.2f} GiB of host memory; "
                  f"--cache-teacher {self.args.cache_teacher})")
            self.kept = self.every_answer() if self.cache else None
        if self.kept is None:
            return self.logp(batch, mask)
        return torch.cat([self.kept[i] for i in indices]).to(mask.device)


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


def train(model, processor, gated, answers, teacher, objective, args, text=None):
    """Minimise the objective over every parameter the gated layers add; returns the history of
    the terms it names, step by step. `text`: the text stream (a TextStream), if the objective
    reads it."""
    # Ours: AdamW without weight decay, which would pull every gate towards 0.5.
    optimizer = torch.optim.AdamW(trained_parameters(gated).values(), lr=args.lr, weight_decay=0.0)
    data, history = batches(len(answers), args.batch_size, args.seed), []
    text_data = batches(len(text.items), args.batch_size, args.seed + 1) if text else None

    def read_text():  # one micro-batch of the text stream, in an order of its own
        indices = next(text_data)
        batch, mask = make_batch(processor, [text.items[i] for i in indices], model.device)
        return answer_logp(model, batch, mask), text.target(indices, mask.device)

    bar = tqdm(range(1, args.steps + 1), desc="Training gates")
    with checkpointing(model, args.gradient_checkpointing):
        for n in bar:
            terms = {}
            for _ in range(args.grad_accum):
                indices = next(data)
                items = [answers[i] for i in indices]
                batch, mask = make_batch(processor, items, model.device)
                step = Step(answer_logp(model, batch, mask), items, batch, mask, gated, args,
                            functools.partial(teacher, indices, batch, mask),
                            read_text if text else None)
                out = objective(step)
                if not torch.isfinite(out["loss"]):
                    raise FloatingPointError(
                        f"the loss became {out['loss'].item()} at step {n}; try a smaller --lr or "
                        f"--lam" + (", or --dtype float32." if args.dtype != "float32" else "."))
                (out["loss"] / args.grad_accum).backward()
                for name, value in out.items():  # each term, averaged over the micro-batches
                    value = torch.as_tensor(value).item() / args.grad_accum
                    terms[name] = terms.get(name, 0.0) + value
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": n, **terms, "mean_gate": mean_gate(gated)})
            bar.set_postfix({k: f"{v:.4f}" for k, v in history[-1].items() if k != "step"})
    return history


# ---- after training: fold each gated layer back into a plain dense weight --------------------

@torch.no_grad()
def fold(model, gated):
    for path, layer in gated.items():
        layer.base.weight.copy_(layer.folded_weight())
        set_module(model, path, layer.base)


def gate_statistics(gated):
    """Per gated layer: its rank, the mean, min and max of its gates (S_eff / S), the share above
    one half, and the fraction of its spectral energy injected."""
    stats = {}
    for path, layer in gated.items():
        s, S = layer.gates(), layer.S
        if len(s) == 0:  # a --band beyond this layer's rank
            stats[path] = {"rank": 0}
            continue
        stats[path] = {"rank": len(s), "mean": s.mean().item(), "min": s.min().item(),
                       "max": s.max().item(), "open": (s > 0.5).float().mean().item(),
                       "injected": ((s * S) ** 2).sum().item() / max((S ** 2).sum().item(),
                                                                      torch.finfo().tiny)}
    return stats


# ---- FRISM, every step above in order --------------------------------------------------------

def subspace_merge(model, processor, lrm_index, base_index, samples, args, make_objective=None,
                   lap=lambda stage: None, text=None):
    """Stage 1 and Eq. 7 (inject), the teacher's answers, Eq. 8-10 (train), the fold. The
    objective is the --objective row of OBJECTIVES, or what make_objective(model, processor,
    gated, answers, args) returns (an objective that needs more than the run has, such as the
    miniature's labelled chains); `text` is the text stream the LRM answered, for an objective
    that reads it.
    lap(stage) marks the end of each stage. Returns (the trained parameters, the gate of every
    direction by layer, what the run did)."""
    gated = inject(model, lrm_index, base_index, args)  # Stage 1, Eq. 7
    lap("svd")
    answers = teacher_answers(model, processor, gated, samples, args)
    teacher = Teacher(model, processor, gated, answers, args)
    lap("teacher")
    objective = (make_objective(model, processor, gated, answers, args) if make_objective
                 else OBJECTIVES[args.objective].function)
    start = mean_gate(gated)
    history = train(model, processor, gated, answers, teacher, objective, args, text)  # Eq. 8-10
    lap("train")
    trained, injected = trained_parameters(gated), -inject_loss(gated).item()
    gates = {path: layer.gates() for path, layer in gated.items()}
    record = {"loss_curve": history, "gates": gate_statistics(gated), "injected": injected,
              "mean_gate_at_start": start,
              "calibration": {"questions": len(samples), "answers": len(answers),
                              "teacher_cached": teacher.kept is not None,
                              "teacher_passes": teacher.passes}}
    fold(model, gated)  # Eq. 7, once
    lap("fold")
    return trained, gates, record


# ==============================================================================================
# The program around the method: Task Arithmetic, command line, checks, data, the text stream,
# scan, speed and memory, dry run, saving, main
# ==============================================================================================

@torch.no_grad()
def task_arithmetic(model, lrm_index, base_index, lam):
    """--no-train at full rank: Eq. 7 with every gate open is W = W_vlm + lam * tau, Task
    Arithmetic, computed exactly and without an SVD. Returns the layers it changed."""
    layers = decoder_layers(model)
    for name, tau in tqdm(task_vectors(lrm_index, base_index, list(layers)), total=len(layers),
                          desc="Task Arithmetic"):
        w = layers[name][1].weight
        w.copy_((w.float() + lam * tau.to(w.device)).to(w.dtype))
    return layers


# Config fields that fix a merged weight's shape must agree; these others only earn a warning.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
SOFT_FIELDS = ("rope_theta", "vocab_size", "max_position_embeddings")
# The paper's calibration set (columns image, question, answers) at its current Hub id; where it
# moved from: docs/running.md.
VIZWIZ = "lmms-lab-encoder/VizWiz-VQA"
# The text stream's default prompts (objectives that read it): GSM8K's grade-school math word
# problems, train split, its "question" column (ours; why: docs/choices.md#the-text-stream).
GSM8K = "openai/gsm8k"
# A vision tower's layers can have the same inner names (Gemma 3, SmolVLM, LLaVA-OneVision:
# "...vision_model.encoder.layers.3.self_attn.q_proj"): only the language model is ever read.
VISION_PREFIX = re.compile(r"vision|visual|image|mm_projector|multi_modal")


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, except where there is none to show (None, or off):
    the help says what happens then."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    """The settings. Each help string gives the default and a short reason; docs/running.md has
    the argument in full. Abbreviated flags are not accepted, so that the flags a user gave are
    known exactly (see VOIDED)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=HelpWithDefaults)
    p.add_argument("--vlm", required=True, help="the VLM: hub id or save_pretrained directory")
    p.add_argument("--lrm", required=True, help="the reasoning LLM whose task vector is injected")
    p.add_argument("--base", required=True, help="the LLM the LRM was fine-tuned from: tau = LRM - "
                   "base (always given: the paper does not name it)")
    p.add_argument("--out", help="directory for the merged model, new or empty (else --overwrite); "
                   "required unless --dry-run or --scan")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--data", default=VIZWIZ, help="label-free perception set (paper: VizWiz VQA): "
                   'a hub dataset id, a local data directory, a save_to_disk directory, or a '
                   '.jsonl of {"image": path, "question": text} lines')
    p.add_argument("--data-split", default="val", help="split of a hub/local dataset")
    p.add_argument("--image-column", default="image", help="image column (or .jsonl field) of "
                   "--data")
    p.add_argument("--question-column", default="question", help="question column (or .jsonl "
                   "field) of --data")
    p.add_argument("--num-samples", type=int, default=512,
                   help="calibration questions used, the first N (ours)")
    p.add_argument("--max-pixels", type=int, default=512 * 28 * 28,
                   help="larger images are shrunk to this many pixels (ours: VizWiz photos are "
                   "large)")
    p.add_argument("--lam", type=float, default=0.2, help="lambda_lrm of Eq. 7: a gate scales its "
                   "subspace from 0 to lam (ours: the paper does not publish it; run --scan first)")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of L_inject (Eq. 9) in the "
                   "objective (ours: the paper does not publish it)")
    p.add_argument("--objective", default="eq10", choices=list(OBJECTIVES), help="what the gates "
                   "minimise: " + "; ".join(f"{k}: {o.description} ({o.source})"
                                            for k, o in OBJECTIVES.items()))
    readers = text_objectives()
    p.add_argument("--beta", type=float, default=1.0, help="weight of the text stream's KL, in "
                   f"{readers} (ours: measured in the miniature, docs/choices.md)")
    p.add_argument("--text-data", default=GSM8K, help=f"the text stream of {readers}: "
                   "unlabelled reasoning prompts that the LRM answers before training, a hub "
                   'dataset id, a local data directory, a save_to_disk directory, or a .jsonl of '
                   '{"question": text} lines (only the prompts are read)')
    p.add_argument("--text-config", default=None, help="config of a hub --text-data; if not "
                   "given, GSM8K's main, or none")
    p.add_argument("--text-split", default="train", help="split of a hub/local --text-data")
    p.add_argument("--text-column", default="question", help="prompt column (or .jsonl field) "
                   "of --text-data")
    p.add_argument("--text-samples", type=int, default=128,
                   help="text prompts used, the first N (ours)")
    p.add_argument("--text-max-new-tokens", type=int, default=1024, help="length limit of the "
                   "LRM's answers to the text prompts (ours: an R1-style model's whole answer to "
                   "a GSM8K question, docs/choices.md)")
    p.add_argument("--gate-init", type=float, default=0.0, help="initial logit of every gate "
                   "(paper: 0, half open; the flag is ours, for the ablation)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps on the gates (ours)")
    p.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate of the gates (ours)")
    p.add_argument("--batch-size", type=int, default=4, help="questions per forward pass (ours)")
    p.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length limit of the VLM "
                   "teacher's answers to the calibration questions (ours: VizWiz answers are "
                   "short)")
    p.add_argument("--rank", type=int, default=None,
                   help="keep only the top-k subspaces of each layer; if not given, all (the "
                   "paper)")
    p.add_argument("--band", type=int, nargs=2, metavar=("FIRST", "LAST"), help="ours, for "
                   "analysis: keep only singular directions FIRST..LAST of each layer (1-based)")
    p.add_argument("--no-train", action="store_true", help="no training, every gate open: Task "
                   "Arithmetic W = W_vlm + lam * tau (truncated by --rank or --band)")
    p.add_argument("--scan", type=float, nargs="+", metavar="LAM", help="ours: no training, no "
                   "model; print Task Arithmetic's KL to the VLM (Eq. 8) at each LAM, to choose "
                   "--lam")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (cuda when there is a GPU)")
    p.add_argument("--device-map", default=None, help="e.g. auto: spread the VLM over every GPU "
                   "(needs accelerate), in place of --device")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="working dtype; if not given, bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order")
    p.add_argument("--dry-run", action="store_true", help="check the configs and --out, print the "
                   "training run's memory plan; no weight or data is read")
    p.add_argument("--device-memory", type=float, default=None,
                   help="GiB the --dry-run plan must fit in; if not given, the GPU's own memory")
    p.add_argument("--cache-teacher", nargs="?", const="yes", default="auto",
                   choices=["auto", "yes", "no"], help="keep the teacher's log-probs in host memory "
                   "instead of recomputing them (speed only); auto: when that saves passes and "
                   "fits in half the free host memory")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass: less memory, more time")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    options = {s: a.dest for a in p._actions for s in a.option_strings}
    tokens = sys.argv[1:] if argv is None else argv
    args.given = sorted({options[t.split("=")[0]] for t in tokens if t.split("=")[0] in options})
    return args


# ---- input checks, before anything heavy -----------------------------------------------------

TRAINING = ("alpha", "objective", "gate_init", "steps", "lr", "grad_accum", "cache_teacher",
            "gradient_checkpointing")
TEXT = ("beta", "text_data", "text_config", "text_split", "text_column", "text_samples",
        "text_max_new_tokens")
DATA = ("data", "data_split", "image_column", "question_column", "num_samples", "max_pixels",
        "max_new_tokens", "batch_size")
# Flags that another flag voids or contradicts: (flag, voided when, why). A flag the user gave in
# such a pair is refused before any work, in one sentence that names both.
VOIDED = [(flag, "no_train", "--no-train trains nothing and reads no data")
          for flag in TRAINING + DATA + TEXT + ("seed",)] + \
         [(flag, "scan", "--scan trains nothing and sets lambda itself")
          for flag in TRAINING + TEXT + ("lam", "seed")] + [
    ("scan", "no_train", "--no-train writes a Task Arithmetic model and --scan writes none"),
    ("scan", "dry_run", "--dry-run plans a training run's memory, and --scan is not one"),
    ("no_train", "dry_run", "--dry-run plans a training run's memory, and --no-train is not one"),
    ("device_map", "dry_run", "--dry-run plans for one device, and --device-map spreads the model"),
    ("device", "device_map", "--device-map places the model itself"),
    ("rank", "band", "--band and --rank both choose the directions kept"),
]
VOIDED_UNLESS = [("device_memory", "dry_run", "--device-memory is the budget of --dry-run's plan"),
                 ("overwrite", "out", "--overwrite replaces --out")]


def flag_name(dest):
    return "--" + dest.replace("_", "-")


def check_flags(args):
    """Every flag, before any work: none voided by another, every number in range (a typo must
    not become a model of NaNs)."""
    given = set(getattr(args, "given", []))
    for dest, by, why in VOIDED:
        if dest in given and by in given:
            raise InputError(f"{flag_name(dest)} has no effect with {flag_name(by)} ({why}): "
                             f"give one of them.")
    for dest, needs, why in VOIDED_UNLESS:
        if dest in given and not getattr(args, needs):
            raise InputError(f"{flag_name(dest)} has no effect without {flag_name(needs)} "
                             f"({why}).")
    for dest in TEXT:
        if dest in given and not OBJECTIVES[args.objective].text:
            raise InputError(f"{flag_name(dest)} has no effect with --objective {args.objective} "
                             f"(only an objective that reads the text stream, {text_objectives()}, "
                             f"uses it).")
    for dest, data in (("data_split", "data"), ("text_split", "text_data"),
                       ("text_config", "text_data")):
        if dest in given and str(getattr(args, data)).endswith(".jsonl"):
            raise InputError(f"{flag_name(dest)} has no effect with a .jsonl {flag_name(data)} (a "
                             f"file of lines has no splits or configs).")
    for dest in ("steps", "batch_size", "grad_accum", "num_samples", "max_new_tokens", "rank",
                 "text_samples", "text_max_new_tokens"):
        if getattr(args, dest, None) is not None and getattr(args, dest) < 1:
            raise InputError(f"{flag_name(dest)} must be a positive integer, not "
                             f"{getattr(args, dest)}.")
    ranges = {"lam": (-math.inf, False), "alpha": (0.0, True), "beta": (0.0, True),
              "lr": (0.0, False), "device_memory": (0.0, False),
              "gate_init": (-math.inf, False)}  # (lowest, allowed)
    for dest, (low, inclusive) in ranges.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            rule = "a finite number" + ("" if low == -math.inf else
                                        f" {'>=' if inclusive else '>'} {low:g}")
            raise InputError(f"{flag_name(dest)} must be {rule}, not {value}.")
    band = getattr(args, "band", None)
    if band and not (1 <= band[0] <= band[1]):
        raise InputError(f"--band FIRST LAST needs 1 <= FIRST <= LAST, not {band[0]} {band[1]}.")
    if not all(math.isfinite(lam) for lam in getattr(args, "scan", None) or []):
        raise InputError("--scan takes finite numbers only.")
    if getattr(args, "max_pixels", 784) < 28 * 28:
        raise InputError(f"--max-pixels must be at least 784 (one 28 x 28 patch), not "
                         f"{args.max_pixels}.")


def check_selection(args, shapes):
    """--band must keep a direction somewhere: refused if it selects none in any merged layer
    (nothing would be injected, and Eq. 9 would be 0/0); one line if it leaves some layers the
    VLM's. `shapes` are the merged weights' (d_out, d_in)."""
    band = getattr(args, "band", None)
    if not band:
        return
    ranks = [min(shape) for shape in shapes]
    kept = [len(range(rank)[kept_directions(args)]) for rank in ranks]
    if not any(kept):
        raise InputError(f"--band {band[0]} {band[1]} selects no direction: the largest rank of a "
                         f"merged layer is {max(ranks)}.")
    empty = kept.count(0)
    if empty:
        print(f"--band {band[0]} {band[1]} selects nothing in {empty} of {len(ranks)} merged "
              f"layers (rank below {band[0]}): they stay the VLM's.", file=sys.stderr)


def check_model_name(name, flag):
    """A local directory, or something shaped like a hub id ("org/name"): else one clear error."""
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise InputError(f"{flag} {name!r} is a file, not a model directory.")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"{flag} {name!r} does not exist, and it is not shaped like a hub id "
                         f"(org/name).")


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
        raise InputError(f"{flag} {name!r} is not a local directory, and the hub could not provide "
                         f"it ({type(e).__name__}).") from e


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
        raise InputError(f"{flag} {path!r} holds no .safetensors weights (only safetensors "
                         f"are read: convert .bin checkpoints first).")
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
    """--out is a new directory, an empty one, or (with --overwrite) one to replace; never an
    input, never a file, and somewhere this process can write."""
    out = os.path.abspath(out)
    for path in inputs:
        path = os.path.abspath(path)
        if out == path or out.startswith(path + os.sep) or path.startswith(out + os.sep):
            raise InputError(f"--out {out!r} overlaps the input {path!r}; inputs are never "
                             f"modified, choose another directory.")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a directory; choose a directory.")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InputError(f"--out {out!r} is a directory that is not empty; pass --overwrite to "
                         f"replace it, or choose another.")
    parent = os.path.dirname(out)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"--out {out!r} cannot be created: {parent!r} is a file.")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out {out!r} cannot be written: this user may not write in "
                         f"{parent!r}.")


def check_inputs(vlm, lrm, base, out=None, overwrite=False):
    """Everything about the three models, before any weight is read: (VLM directory, LRM index,
    base index). baselines.py checks its inputs with this too."""
    vlm, lrm, base = (local_dir(name, f"--{flag}") for name, flag in
                      ((vlm, "vlm"), (lrm, "lrm"), (base, "base")))
    if os.path.realpath(lrm) == os.path.realpath(base):
        raise InputError(f"--lrm and --base are the same checkpoint ({lrm!r}): its task vector "
                         f"is zero, so there is nothing to inject.")
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
    """A list of (image, question) pairs: from a .jsonl file, or a hub/local dataset; every row
    read and every image decoded here, before any weight loads."""
    from PIL import Image
    columns = (args.image_column, args.question_column)
    if args.data.endswith(".jsonl"):
        root, rows = os.path.dirname(os.path.abspath(args.data)), []
        for n, item in jsonl_lines("--data", args.data):
            if not all(column in item for column in columns):
                raise InputError(f"--data {args.data!r} line {n} has no {columns[0]!r} or no "
                                 f"{columns[1]!r} (--image-column, --question-column).")
            rows.append((f"line {n}", os.path.join(root, str(item[columns[0]])), item[columns[1]]))
            if len(rows) == args.num_samples:
                break
    else:
        rows = [(f"row {n}", row[columns[0]], row[columns[1]]) for n, row in enumerate(
            dataset_rows("--data", args.data, args.data_split, columns, args.num_samples), 1)]
    if not rows:
        raise InputError(f"--data {args.data!r} holds no calibration questions.")
    samples = []
    for where, image, question in rows:
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"--data {args.data!r} {where} holds a question that is not text "
                             f"({question!r:.60}).")
        try:
            samples.append((fit_pixels(Image.open(image) if isinstance(image, str) else image,
                                       args.max_pixels), question))
        except (OSError, AttributeError, ValueError) as e:
            raise InputError(f"--data {args.data!r} {where} has no readable image "
                             f"({type(e).__name__}: {e}).") from e
    return samples


def jsonl_lines(flag, path):
    """(line number, object) for each non-empty line of a .jsonl file. A line that is not UTF-8
    text, not JSON or not an object ends the run in one sentence naming the flag, file and line."""
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path!r} does not exist.")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{flag} {path!r} line {n} is not UTF-8 text (byte "
                                 f"{raw[e.start]:#04x} at column {e.start + 1}); save the file "
                                 f"as UTF-8.") from e
            except ValueError as e:
                raise InputError(f"{flag} {path!r} line {n} is not JSON ({e}).") from e
            if not isinstance(item, dict):
                raise InputError(f"{flag} {path!r} line {n} is not a JSON object "
                                 f"({raw.decode('utf-8').strip():.60}).")
            yield n, item


def local_jsonl_faults(flag, path):
    """Where a local data directory could not be read: its .jsonl files line by line, so that a
    line at fault is named (jsonl_lines raises on it); nothing where none is."""
    if os.path.isdir(path):
        for file in sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                           if f.endswith(".jsonl")):
            for _ in jsonl_lines(flag, file):
                pass


def open_dataset(path, split, config=None, streaming=False):
    """A datasets.save_to_disk directory, or anything load_dataset reads (hub id, data files)."""
    import datasets
    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
            os.path.join(path, "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(path, config, split=split, streaming=streaming)


def dataset_rows(flag, path, split, columns, limit, config=None):
    """The first `limit` rows (those columns) of a hub dataset, streamed (only what is used is
    downloaded), a local data directory or a saved one, read here so that a fault in them is one
    sentence before any weight loads; in a local directory's .jsonl files, with its line."""
    try:
        ds = open_dataset(path, split, config, streaming=True)
    except Exception as e:
        local_jsonl_faults(flag, path)
        raise InputError(f"{flag} {path!r} split {split!r} could not be loaded "
                         f"({type(e).__name__}: {e}).") from e
    has = ds.column_names or list(ds.features or [])
    for column in columns:
        if has and column not in has:
            raise InputError(f"{flag} {path!r} has no column {column!r} (it has {has}).")
    rows = []
    try:
        for row in ds:
            rows.append({column: row[column] for column in columns})
            if len(rows) == limit:
                break
    except Exception as e:
        local_jsonl_faults(flag, path)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{flag} {path!r} split {split!r}: row {len(rows) + 1} could not be "
                         f"read ({type(e).__name__}: {reason:.200}).") from e
    return rows


# ---- the text stream, for objectives that read it: prompts, then the LRM's answers -----------

def reads_text(args):
    """Does the run train with an objective that reads the text stream?"""
    return not args.no_train and not args.scan and OBJECTIVES[args.objective].text


def text_objectives():
    """The objectives that read the text stream (rows of OBJECTIVES with text=True), as messages
    and help name them: "--objective dual"."""
    return "--objective " + " or ".join(name for name, row in OBJECTIVES.items() if row.text)


def load_text_prompts(args):
    """The text stream's unlabelled reasoning prompts: a .jsonl with one prompt a line (in the
    --text-column field), or one column of a hub/local dataset (its answers, if it has any, are
    never read)."""
    flag, column = "--text-data", args.text_column
    if args.text_data.endswith(".jsonl"):
        rows = []
        for n, item in jsonl_lines(flag, args.text_data):
            if column not in item:
                raise InputError(f"{flag} {args.text_data!r} line {n} has no {column!r} "
                                 f"(--text-column).")
            rows.append((f"line {n}", item[column]))
            if len(rows) == args.text_samples:
                break
    else:  # ours: GSM8K, the default, has two configs; the plain one is "main"
        config = args.text_config or ("main" if args.text_data == GSM8K else None)
        rows = [(f"row {n}", row[column]) for n, row in enumerate(dataset_rows(
            flag, args.text_data, args.text_split, (column,), args.text_samples, config), 1)]
    for where, prompt in rows:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{flag} {args.text_data!r} {where} holds a prompt that is not text "
                             f"({prompt!r:.60}).")
    if not rows:
        raise InputError(f"{flag} {args.text_data!r} holds no prompts.")
    return [prompt for _, prompt in rows]


def check_text_stream(vlm, lrm):
    """Ours: the text stream's KL compares the LRM's next-token distribution with the merged
    model's, at the LRM's answer ids read by the VLM. So both need one output size and one
    vocabulary; their added tokens (chat formats) may differ, and an answer ends before the
    first token that the VLM reads as another (R1-Distill's `</think>` is Qwen2.5-VL's
    `<|box_end|>`). Returns those token ids."""
    from transformers import AutoTokenizer
    sizes = {flag: language_config(load_config(path, flag)).vocab_size
             for flag, path in (("--vlm", vlm), ("--lrm", lrm))}
    if sizes["--vlm"] != sizes["--lrm"]:
        raise InputError(f"{text_objectives()} compares the LRM's next-token distribution with "
                         f"the VLM's, but their output sizes differ ({sizes['--lrm']} and "
                         f"{sizes['--vlm']}).")
    tokenizers = {}
    for flag, path in (("--vlm", vlm), ("--lrm", lrm)):
        try:
            tokenizers[flag] = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise InputError(f"{flag} {path!r} has no readable tokenizer ({type(e).__name__}).") \
                from e
    vlm_tok, lrm_tok = tokenizers["--vlm"], tokenizers["--lrm"]
    added = {**vlm_tok.get_added_vocab(), **lrm_tok.get_added_vocab()}
    plain = lambda tok: {t: i for t, i in tok.get_vocab().items() if t not in added}  # noqa: E731
    if plain(vlm_tok) != plain(lrm_tok):
        raise InputError(f"{text_objectives()} reads the LRM's answers with the VLM's tokenizer, "
                         "but the two tokenizers' vocabularies differ: they are not one family.")
    return {i for tok, other in ((lrm_tok, vlm_tok), (vlm_tok, lrm_tok))
            for t, i in tok.get_added_vocab().items() if other.convert_ids_to_tokens(i) != t}


def answer_text_prompts(lrm_path, prompts, unreadable, args):
    """Load the LRM, let it answer the prompts (lrm_answers), release it: the TextStream."""
    import gc
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lrm = AutoModelForCausalLM.from_pretrained(lrm_path, dtype=getattr(torch, args.dtype),
                                               device_map=args.device_map)
    if args.device_map is None:
        lrm.to(args.device)
    lrm.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(lrm_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    try:
        return lrm_answers(lrm, tokenizer, prompts, unreadable, args)
    finally:
        del lrm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
            teacher = answer_logp(model, batch, mask)
        n = int(mask.sum())
        for k, lam in enumerate(lams):
            for layer in gated.values():
                layer.lam = lam
            sums[k] += distill_loss(answer_logp(model, batch, mask), teacher).item() * n
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
    print("Task Arithmetic loses perception where the KL rises steeply. The scan cannot tell "
          "where FRISM transfers the most: in the miniature its best lam lay between that lambda "
          "and three times it. Train FRISM at a few --lam in that range and score each with "
          "eval.py.")


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


TEXT_PROMPT_TOKENS = 256  # the plan's length of a text-stream prompt (ours: GSM8K's are shorter)


def memory_plan(cfg, parameters, args, device_gib, lrm_parameters=None):
    """Bytes of everything a run holds at its peak, and the largest --rank that fits (ours: an
    estimate; activations are those the backward pass to the gates keeps, per token and layer).
    With a text stream, its micro-batch adds its activations, and the LRM's answering stage,
    before the VLM loads, is planned on its own."""
    t = language_config(cfg)
    b = torch.finfo(getattr(torch, args.dtype)).bits // 8
    shapes = list(expected_shapes(t).values())
    tokens = args.batch_size * (args.max_pixels // (28 * 28) + 64 + args.max_new_tokens)
    text_tokens = args.batch_size * (TEXT_PROMPT_TOKENS + args.text_max_new_tokens) \
        if lrm_parameters else 0
    layers, h, i = t.num_hidden_layers, t.hidden_size, t.intermediate_size
    logits = args.batch_size * args.max_new_tokens * t.vocab_size * 4 * 4
    text_logits = args.batch_size * args.text_max_new_tokens * t.vocab_size * 4 * 4

    def plan(rank):
        keep = kept_directions(args) if args.band else slice(None, rank)
        r = [len(range(min(s))[keep]) for s in shapes]  # directions kept in each layer
        factors = sum(k * (d_out + d_in) * b + 2 * k * 4 for (d_out, d_in), k in zip(shapes, r))
        one_layer = 12 * h + 3 * i + 2 * sum(r) / layers  # what a layer keeps for its backward
        per_token = b * (layers * h + one_layer if args.gradient_checkpointing else
                         layers * one_layer)
        items = {"VLM weights": parameters * b, "frozen factors U, S, Vh": factors,
                 "gates, gradients, AdamW state": sum(r) * 4 * 4,
                 "activations (estimate)": tokens * per_token + logits,
                 "SVD workspace (transient)": 3 * max(o * n for o, n in shapes) * 4}
        if text_tokens:
            items["text stream activations (est.)"] = text_tokens * per_token + text_logits
        return items, sum(items.values()) / 2 ** 30

    items, total = plan(args.rank)
    fitting = None
    if device_gib and total > device_gib and not args.band:
        top = max(min(s) for s in shapes)
        fitting = next((k for k in range(top - top % 64, 0, -64) if plan(k)[1] <= device_gib),
                       None)
    out = {"items": {k: v / 2 ** 30 for k, v in items.items()}, "total_gib": total,
           "device_gib": device_gib, "tokens": tokens,
           "fits": None if not device_gib else total <= device_gib, "rank_that_fits": fitting}
    if lrm_parameters:  # generation's KV cache, then one pass for the LRM's log-probs
        kv = text_tokens * layers * 2 * t.num_key_value_heads * config_value(t, "head_dim") * b
        lrm = {"LRM weights": lrm_parameters * b, "KV cache, activations (est.)":
               kv + text_tokens * (h + i) * b * 4 + text_logits}
        out["lrm_stage"] = {k: v / 2 ** 30 for k, v in lrm.items()}
        out["lrm_stage_gib"] = sum(lrm.values()) / 2 ** 30
        if device_gib:
            out["fits"] = out["fits"] and out["lrm_stage_gib"] <= device_gib
    return out


def dry_run(args):
    """Check the three configs, the directions kept and --out, and print the memory plan of the
    training run the flags describe; no weight or data is downloaded or read."""
    configs = {}
    for flag in ("vlm", "lrm", "base"):
        check_model_name(getattr(args, flag), f"--{flag}")
        configs[flag] = load_config(getattr(args, flag), f"--{flag}")
    check_configs(language_config(configs["vlm"]), {"--lrm": language_config(configs["lrm"]),
                                                    "--base": language_config(configs["base"])})
    check_selection(args, expected_shapes(language_config(configs["vlm"])).values())
    if args.out:
        check_out(args.out, [args.vlm, args.lrm, args.base], args.overwrite)
    parameters, source = parameter_count(args.vlm, configs["vlm"])
    lrm_parameters = parameter_count(args.lrm, configs["lrm"])[0] if reads_text(args) else None
    device_gib = args.device_memory or (torch.cuda.get_device_properties(0).total_memory / 2 ** 30
                                        if args.device.startswith("cuda") and
                                        torch.cuda.is_available() else None)
    plan = memory_plan(configs["vlm"], parameters, args, device_gib, lrm_parameters)
    if plan["fits"] is False and not args.gradient_checkpointing:
        plan["checkpointing_fits"] = memory_plan(configs["vlm"], parameters, argparse.Namespace(
            **dict(vars(args), gradient_checkpointing=True)), device_gib, lrm_parameters)["fits"]
    print(f"FRISM memory plan: {args.dtype}, rank {args.rank or 'all'}, batch {args.batch_size}, "
          f"{plan['tokens'] // args.batch_size} tokens a sample, VLM parameters {source}")
    if lrm_parameters:
        print(f"  first, the LRM answers at most {args.text_samples} text prompts (up to "
              f"{args.text_max_new_tokens} tokens each) and is released:")
        for item, gib in plan["lrm_stage"].items():
            print(f"  {item:32s} {gib:8.2f} GiB")
        print(f"  {'peak of that stage':32s} {plan['lrm_stage_gib']:8.2f} GiB")
        print("  then the VLM loads and trains:")
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
    print(f"  host memory for a teacher cache: at most {cache / 2 ** 30:.2f} GiB (taken by "
          f"--cache-teacher auto where it fits and the objective reads the teacher)")
    if lrm_parameters:
        kept = args.text_samples * args.text_max_new_tokens * (TEXT_TOP_K * (8 + 4) + 4)
        print(f"  host memory for the LRM's top-{TEXT_TOP_K} log-probs on the text stream: at "
              f"most {kept / 2 ** 30:.2f} GiB (always kept: the LRM is gone when training starts)")
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


# Ours: the gates go beside the model in a subdirectory, where no model loader looks. Without a
# shard index (transformers writes none for a checkpoint of up to 50 GB), vLLM and SGLang load every
# *.safetensors file at the top of a model directory, and a tensor the model does not have stops
# them; the top of --out holds the checkpoint's own files only.
GATES_DIR = "gates"
GATE_PARAMETERS = f"{GATES_DIR}/parameters.safetensors"  # every trained parameter (FRISM: g)
GATE_VALUES = f"{GATES_DIR}/values.safetensors"  # the gate of every direction, S_eff / S


def save(model, processor, out, dtype, extra, overwrite=False):
    """Write the model, its processor and `extra` ({file path: writer(path)}) into a hidden
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
            os.makedirs(os.path.dirname(os.path.join(tmp, file)), exist_ok=True)
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


TASK_ARITHMETIC = ("Task Arithmetic (Ilharco et al., ICLR 2023), W = W_vlm + lam * tau: Eq. 7 of "
                   "FRISM with every gate open (frism.py --no-train), the same merge as "
                   "baselines.py ta.")


def objective_name(args, make_objective):
    """What the report and the model card say the gates minimised."""
    if make_objective is not None:
        return f"{make_objective.__module__}.{make_objective.__qualname__} (given by the caller)"
    row = OBJECTIVES[args.objective]
    return f"{args.objective}: {row.description}; from {row.source}"


def frism_card(args, command, report):
    split = "" if args.data.endswith(".jsonl") else f" (split {args.data_split})"
    directions = (f"{args.band[0]}-{args.band[1]}" if args.band else
                  f"top {args.rank}" if args.rank else "all")
    if args.no_train:
        settings = {"lambda (--lam)": args.lam, "directions": directions,
                    "training": "none (--no-train): every gate open"}
        figures = [f"Task Arithmetic: every gate open, W = W_vlm + {args.lam} * tau"
                   + (f" (top {args.rank} directions)" if args.rank else "")
                   + (f" (directions {args.band[0]}-{args.band[1]} only)" if args.band else "")
                   + "."]
    else:
        settings = {"lambda (--lam)": args.lam, "alpha (--alpha)": args.alpha,
                    "objective": report["objective"], "gate start (--gate-init)": args.gate_init,
                    "steps": args.steps, "directions": directions,
                    "calibration data": f"{args.data}{split}, at most {args.num_samples} questions"}
        if reads_text(args):
            settings["beta (--beta)"] = args.beta
            settings["text stream (--text-data)"] = (
                f"{args.text_data}, {report['text_stream']['answers']} prompts answered by the "
                f"LRM (at most {args.text_samples})")
        stats = [s for s in report["gates"].values() if s["rank"]]
        ranks = sum(s["rank"] for s in stats)
        mean = sum(s["mean"] * s["rank"] for s in stats) / ranks
        open_ = sum(s["open"] * s["rank"] for s in stats) / ranks
        last = {k: v for k, v in report["loss_curve"][-1].items()
                if k not in ("step", "loss", "mean_gate")}
        figures = [f"{len(report['gates'])} gated layers, {ranks} gates: mean gate (S_eff / S) "
                   f"{mean:.3f}, {100 * open_:.1f} % above 0.5 (at the start: "
                   f"{report['mean_gate_at_start']:.2f}).",
                   f"Injected spectral energy at the end of training: {report['injected']:.3f} "
                   f"of the task vectors'.",
                   "The objective's terms at the last step: " + ", ".join(
                       f"{k} {v:.4g}" for k, v in last.items()) + "."]
    figures.append(f"The gates are beside the model, in `{GATE_PARAMETERS}` (every trained "
                   f"parameter) and `{GATE_VALUES}` (the gate of every direction, S_eff / S), "
                   f"where no model loader reads them.")
    if args.no_train:  # the model is Task Arithmetic's, and its card says so
        return model_card(args.vlm, args.lrm, args.base, "ta", TASK_ARITHMETIC, settings,
                          figures, command)
    return model_card(args.vlm, args.lrm, args.base, "frism", FRISM_PAPER, settings, figures,
                      command)


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
    """Check, load, merge (FRISM, Task Arithmetic, or the scan), save; returns the report.
    make_objective(model, processor, gated, answers, args) -> objective replaces --objective."""
    lap = Laps()
    check_flags(args)
    if args.dry_run:
        return {"plan": dry_run(args)}
    if not args.out and not args.scan:
        raise InputError("--out is required (where the merged model goes).")
    if args.out:
        remove_stale_staging(args.out, "frism.py")
    vlm, lrm_index, base_index = check_inputs(args.vlm, args.lrm, args.base, args.out,
                                              args.overwrite)
    check_selection(args, [shape for _, _, shape in lrm_index.values()])
    samples = None if args.no_train else load_calibration(args)
    prompts = load_text_prompts(args) if reads_text(args) else None
    if prompts:
        lrm = local_dir(args.lrm, "--lrm")
        unreadable = check_text_stream(vlm, lrm)
    lap("check")
    frugal_host_memory()
    text = None
    if prompts:  # the LRM answers first and is released, so it never sits beside the VLM
        text = answer_text_prompts(lrm, prompts, unreadable, args)
        lap("lrm_answers")
        if text.cut > len(prompts) / 10:  # ours: more than a tenth cut is worth a line
            print(f"frism.py: {text.cut} of the LRM's {len(prompts)} answers reached "
                  f"--text-max-new-tokens {args.text_max_new_tokens} and were cut; raise it so "
                  f"that the text stream holds whole answers.", file=sys.stderr)
    model, processor = load_vlm(vlm, args.dtype, args.device, args.device_map)
    lap("load")
    if args.scan:
        report = {"scan": scan(model, processor, lrm_index, base_index, samples, args, lap)}
    elif args.no_train:
        trained, gates, report = task_arithmetic_merge(model, lrm_index, base_index, args, lap)
    else:
        trained, gates, report = subspace_merge(model, processor, lrm_index, base_index, samples,
                                                args, make_objective, lap, text)
        report["objective"] = objective_name(args, make_objective)
        if text:
            report["text_stream"] = {"prompts": len(prompts), "answers": len(text.items),
                                     "answer_tokens": sum(len(a.ids) for a in text.items),
                                     "cut_by_limit": text.cut}
    report = {"args": vars(args), "command": command, "versions": versions(),
              "seconds": lap.seconds, "memory": dict(peak_memory(), after_stage=lap.peaks),
              **report}
    if args.scan:
        if args.out:  # the table alone: no model is written
            save(None, None, args.out, None, {"frism_report.json": write_json(report)},
                 args.overwrite)
        return report
    save(model, processor, args.out, checkpoint_dtype(vlm, model.dtype),
         {GATE_PARAMETERS: write_tensors(trained), GATE_VALUES: write_tensors(gates),
          "frism_report.json": write_json(report),
          "README.md": frism_card(args, command, report)}, args.overwrite)
    return report


def task_arithmetic_merge(model, lrm_index, base_index, args, lap):
    """--no-train: every gate fully open. At full rank exactly and without an SVD; with --rank or
    --band through the gated layers (truncated Task Arithmetic). The saved gates are +inf, every
    gate value 1."""
    if kept_directions(args) == slice(None):
        layers = task_arithmetic(model, lrm_index, base_index, args.lam)
        ranks = {path: min(m.weight.shape) for path, m in layers.values()}
        lap("task_arithmetic")
        return ({f"{path}.g": torch.full((r,), math.inf) for path, r in ranks.items()},
                {path: torch.ones(r) for path, r in ranks.items()},
                {"gates": {}, "loss_curve": []})  # no subspaces were formed
    gated = inject(model, lrm_index, base_index, args)
    lap("svd")
    for layer in gated.values():
        layer.g.data.fill_(math.inf)  # every kept gate fully open
    trained, stats = trained_parameters(gated), gate_statistics(gated)
    gates = {path: layer.gates() for path, layer in gated.items()}
    fold(model, gated)
    lap("fold")
    return trained, gates, {"gates": stats, "loss_curve": []}


def scan(model, processor, lrm_index, base_index, samples, args, lap):
    """--scan: the gated layers (every direction kept, or --rank / --band), the teacher's answers,
    then Task Arithmetic's KL at each lambda; prints and returns the table."""
    gated = inject(model, lrm_index, base_index, args)
    lap("svd")
    answers = teacher_answers(model, processor, gated, samples, args)
    lap("teacher")
    table = lambda_scan(model, processor, gated, answers, args.scan, args.batch_size)
    print_scan(table)
    lap("scan")
    return table


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
        print(f"{prog}: interrupted; nothing was written" + (f" to {out!r}." if out else "."),
              file=sys.stderr)
        return 130, None
    except OSError as e:  # a full disk, a read-only directory
        print(f"{prog}: error: {e}; nothing was written" + (f" to {out!r}." if out else "."),
              file=sys.stderr)
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
