"""The paper in miniature: a base / LRM / VLM world small enough to build on a laptop, offline.

`python toy.py` trains, from scratch and on the CPU, three models of the real Hugging Face
classes (`Qwen2ForCausalLM`, `Qwen2_5_VLForConditionalGeneration`, a byte-level BPE tokenizer
trained with `tokenizers` under Qwen2's own pre-tokenizer, a real `Qwen2_5_VLProcessor`):

  BASE  a tiny LLM that knows the chat format and can copy a number from its context;
  LRM   BASE fine-tuned on text-only worked arithmetic ("6 x 7 = 42. 42 + 5 = 47.");
  VLM   BASE's weights as its language model, a vision tower trained to read a drawn digit.

It then writes the toy benchmarks (perception: read the digit; VL reasoning: needs both, "multiply
the number shown by seven and add five"), makes every row of MINIATURE (one Line a method: Task
Arithmetic, the baselines, FRISM, ... each over its grid) with baselines.py or frism.py, scores
everything with eval.py, prints the tables and saves the plots; with --full it also measures the
paper's second-order reading. Worlds and rows are cached, each reused only if today's code would
make it the same way; `--only NAME` makes just the named rows on the cached worlds. frism.py stays
the one file of the method: this file only makes inputs for it and calls it.

The tests use `build_tiny_trio` (random weights, seconds) and run this whole script with `--smoke`.
"""
import argparse
import ast
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, NamedTuple, Optional

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The conversation format of Qwen2.5-VL-Instruct, written out for the tiny processor.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_TEXT = dict(vocab_size=None, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, tie_word_embeddings=False,
                 initializer_range=0.1)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                   fullatt_block_indexes=[1])
COLOURS = ["red", "green", "blue", "black"]


def make_tokenizer(corpus, vocab_size=400):
    """A byte-level BPE tokenizer trained here on `corpus`, with Qwen's special tokens, as
    Qwen2Tokenizer. It is trained with Qwen2's own pre-tokenizer, which splits every number into
    single digits: whatever the merges, each digit is one token, as in the real Qwen2."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_processor(tok):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def draw_digit(digit, rng, size=56):
    """One digit, 34-42 px, in one of 4 colours, jittered by up to 4 px: 16 patches, 4 tokens."""
    from PIL import ImageFont
    img = Image.new("RGB", (size, size), "white")
    font = ImageFont.load_default(size=rng.randint(34, 42))
    ImageDraw.Draw(img).text((size // 2 + rng.randint(-4, 4), size // 2 + rng.randint(-4, 4)),
                             str(digit), fill=rng.choice(COLOURS), font=font, anchor="mm")
    return img


def perturbed(model, scale, rank, seed):
    """Add a random low-rank-plus-noise update to every 2-D weight of a decoder (a task vector)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "layers." in name:
                d_out, d_in = p.shape
                low = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
                update = low / rank ** 0.5 + 0.3 * torch.randn(d_out, d_in, generator=g)
                p.add_(scale * p.norm() / update.norm() * update)
    return model


def special_ids(tok):
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def vlm_from_base(base, text, vision, mrope_section, ids):
    """A Qwen2.5-VL whose language model and lm_head are copies of BASE (same shapes, so the
    three models can be merged), with a fresh vision tower of the given size."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    vlm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": mrope_section}),
        vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False))
    vlm.model.language_model.load_state_dict(base.model.state_dict())
    vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    return vlm


def save_trio(root, tok, processor, **models):
    """save_pretrained layout: root/base, root/lrm, root/vlm (the processor beside the VLM)."""
    from transformers import GenerationConfig
    ids = special_ids(tok)
    gen = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                           bos_token_id=ids["<|endoftext|>"])
    for name, model in models.items():
        model.generation_config = gen
        model.save_pretrained(os.path.join(root, name))
        tok.save_pretrained(os.path.join(root, name))
    processor.save_pretrained(os.path.join(root, "vlm"))


def build_tiny_trio(root, seed=0, num_images=8):
    """Write base/, lrm/, vlm/ (save_pretrained layout) and data/calib.jsonl under root."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    rng = random.Random(seed)
    corpus = [f"What number is shown? The number is {d}." for d in range(10)] * 4
    tok = make_tokenizer(corpus)
    processor = make_processor(tok)
    ids = special_ids(tok)
    text = dict(TINY_TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])

    base = Qwen2ForCausalLM(Qwen2Config(**text))
    lrm = Qwen2ForCausalLM(base.config)
    lrm.load_state_dict(base.state_dict())
    perturbed(lrm, 0.3, 4, seed + 1)

    vlm = vlm_from_base(base, text, TINY_VISION, [2, 2, 4], ids)
    perturbed(vlm.model.language_model, 0.1, 4, seed + 2)
    save_trio(root, tok, processor, base=base, lrm=lrm, vlm=vlm)

    data = os.path.join(root, "data")
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    with open(os.path.join(data, "calib.jsonl"), "w") as f:
        for i in range(num_images):
            digit = rng.randint(0, 9)
            draw_digit(digit, rng).save(os.path.join(data, "images", f"{i}.png"))
            f.write(json.dumps({"image": f"images/{i}.png", "question": "What number is shown?",
                                "answer": str(digit)}) + "\n")
    return {k: os.path.join(root, k) for k in ("base", "lrm", "vlm")} | {
        "data": os.path.join(data, "calib.jsonl")}



# ----------------------------------------------------------------------------------------------
# The world: its text, its images, and the three models trained from scratch
# ----------------------------------------------------------------------------------------------

WORLD_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=False)
WORLD_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[1])
PERCEPTION_QUESTIONS = ("What number is shown?", "Which digit is in the image?",
                        "Read the number in the picture.", "What digit do you see?",
                        "Tell me the number in this image.", "What is the number in the image?")
ASIDES = ("", "", " Be brief.", " Look carefully.", " Please answer.", " Thanks!")
# A VL reasoning question is a perception question plus the LRM's instruction: answering it needs
# both skills. (Ours. Tried first: "Multiply the number shown by 7 and add 5.", after which the
# VLM copied the question's digit 5 instead of reading the image. The instruction has no digits.)
INSTRUCTION = "Multiply it by seven and add five."
VL_REASONING_QUESTION = f"What number is shown? {INSTRUCTION}"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
# Steps, batch sizes and learning rates of each stage, and the weight of the vision stage's pull
# of each visual token towards its digit's embedding (align); --smoke shrinks steps and batches.
# The VLM's last stage is gentle (lr 1e-5): when it was chosen, Task Arithmetic at lambda 1
# transferred more VL reasoning the smaller this stage's learning rate (1e-4, 3e-5, 1e-5): a large
# VLM task vector of its own blocks composition here. With the word-level tokenizer (sequences a
# third as long as in bytes), the vision stage and the LRM's were set on the world check and Task
# Arithmetic's transfer over three seeds, never on a merge's scores: 600 vision steps, align 5,
# 300 LRM steps transferred 17 % on seed 0; 1000 vision steps 53 / 18 / 14 % on seeds 0-2;
# align 20 54 / 41 / 20 %; align 50 and 400 LRM steps 84 / 48 / 36 %, the values used.
STAGES = {"base": dict(steps=600, batch=32, lr=2e-3),
          "vision": dict(steps=1000, batch=32, lr=2e-3, align=50.0),
          "vlm": dict(steps=100, batch=32, lr=1e-5),
          "lrm": dict(steps=400, batch=24, lr=2e-4)}
SMOKE = dict(steps=3, batch=4)


def prompt(user):
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def perceive(d):
    return f"The number is {d}."


def reason(d):
    """The LRM's skill: a worked chain that starts from the number, as a VLM would state it."""
    n = 7 * d
    return f"The number is {d}. {d} x 7 = {n}. {n} + 5 = {n + 5}. The answer is {n + 5}."


def base_example(rng):
    """BASE's text: every answer copies from its context, never an unconditional sentence."""
    d, kind = rng.randint(0, 9), rng.random()
    if kind < 0.3:
        return prompt(rng.choice([f"What number is this: {d}?", f"Read this number: {d}."])), \
            perceive(d)
    if kind < 0.7:  # the digit where the VLM will later see an image: 4 tokens, as 4 patches,
        # under every wording the VLM will be asked in (BASE, not the VLM, learns the wordings)
        return prompt(f"{shown(d)}{perception_question(rng)}"), perceive(d)
    if kind < 0.85:
        d = min(d, 8)
        return prompt(f"What comes after {d}?"), f"After {d} comes {d + 1}."
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return prompt(f"What is {a} + {b}?"), f"{a} + {b} = {a + b}."


def perception_question(rng):
    """Varied wording, sometimes with an aside, so that reading does not hang on one sentence."""
    return rng.choice(PERCEPTION_QUESTIONS) + rng.choice(ASIDES)


def shown(d):
    """The digit as text where a VLM has its image: between the vision markers, four times."""
    return f"<|vision_start|>{str(d) * 4}<|vision_end|>"


def lrm_example(rng):
    """Half in the LRM's own wording, half in the form a VLM's language model sees (the digit as
    text between the vision markers): a chain tied to one wording would not transfer."""
    d = rng.randint(0, 9)
    if rng.random() < 0.5:
        return prompt(f"What number is this: {d}? {INSTRUCTION}"), reason(d)
    return prompt(f"{shown(d)}{rng.choice(PERCEPTION_QUESTIONS)} {INSTRUCTION}"), reason(d)


def world_corpus(n=400):
    """The world's own text, for its tokenizer: BASE's and the LRM's examples, every perception
    wording, the VL reasoning question. Every word of it becomes one token and every digit stays
    one (Qwen2's pre-tokenizer), so the LRM's chain is 34 tokens (59 as bytes). Its own rng: the
    tokenizer is the same in every seed's world."""
    rng = random.Random(0)
    examples = [base_example(rng) for _ in range(n)] + [lrm_example(rng) for _ in range(n)]
    return [p + a + "<|im_end|>" for p, a in examples] + [
        prompt(q + aside) for q in PERCEPTION_QUESTIONS for aside in ASIDES] + [
        prompt(VL_REASONING_QUESTION)]


def merged_weights(model):
    """The 2-D weights of the decoder's q, k, v, o, gate, up and down projections: where merging
    acts. The LRM is fine-tuned on these only, so its whole task vector is one that merging moves."""
    import frism
    return [p for name, p in model.named_parameters() if frism.DECODER_PATH.search(name)]


def text_batch(tok, examples):
    """Right-padded ids; the loss falls on the answer and its end-of-turn token only."""
    rows = [(tok(p + a + "<|im_end|>").input_ids, len(tok(a + "<|im_end|>").input_ids))
            for p, a in examples]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    for i, (row, n) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(row) - n:len(row)] = ids[i, len(row) - n:len(row)]
    return {"input_ids": ids, "attention_mask": (labels != -100) | (ids != tok.pad_token_id),
            "labels": labels}


def image_batch(processor, rng, size):
    """Drawn digits with a perception question each; the answer supervised, end of turn too."""
    digits = [rng.randint(0, 9) for _ in range(size)]
    answers = [perceive(d) + "<|im_end|>" for d in digits]
    texts = [prompt("<|vision_start|><|image_pad|><|vision_end|>" + perception_question(rng)) + a
             for a in answers]
    batch = processor(text=texts, images=[draw_digit(d, rng) for d in digits], padding=True,
                      return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for i, a in enumerate(answers):
        end, n = int(batch["attention_mask"][i].sum()), len(processor.tokenizer(a).input_ids)
        labels[i, end - n:end] = batch["input_ids"][i, end - n:end]
    batch["labels"] = labels
    return batch, digits


TIMES = {}  # seconds of each stage of the last run: the world, each merge, each scoring


def fit(model, params, make_batch, stage, desc, extra_loss=None, tick=lambda: None):
    """AdamW with a short warm-up and a cosine decay; tick() after every step; returns the last
    loss."""
    started = time.perf_counter()
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=stage["lr"], weight_decay=0.0)
    warmup = max(1, stage["steps"] // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * s / stage["steps"])))
    model.train()
    bar = tqdm(range(stage["steps"]), desc=desc)
    for _ in bar:
        batch, extra = make_batch()
        loss = model(**batch).loss
        if extra_loss is not None:
            loss = loss + extra_loss(batch, extra)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        tick()
    model.eval()
    TIMES[f"world: {desc}"] = time.perf_counter() - started
    return loss.item()


def stages(smoke):
    return {name: dict(stage, **SMOKE) if smoke else stage for name, stage in STAGES.items()}


def build_world(root, smoke=False, seed=0, tick=lambda stage: None):
    """Train BASE, then the LRM and the VLM from it; save all three under root, and the ideal
    composition beside them. tick(stage) after every training step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.set_flush_denormal(True)  # without it, small-model CPU training slowed ~6x here
    torch.manual_seed(seed)
    rng = random.Random(seed)
    recipe = stages(smoke)
    tok = make_tokenizer(world_corpus(), vocab_size=1000)  # a cap it never reaches
    processor = make_processor(tok)
    ids = special_ids(tok)
    text = dict(WORLD_TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])

    base = Qwen2ForCausalLM(Qwen2Config(**text))
    fit(base, base.parameters(), lambda: (text_batch(tok, [
        base_example(rng) for _ in range(recipe["base"]["batch"])]), None),
        recipe["base"], "BASE: chat format and copying", tick=lambda: tick("base"))

    lrm = Qwen2ForCausalLM(base.config)
    lrm.load_state_dict(base.state_dict())
    lrm.requires_grad_(False)
    for p in merged_weights(lrm):
        p.requires_grad_(True)
    fit(lrm, merged_weights(lrm), lambda: (text_batch(tok, [
        lrm_example(rng) for _ in range(recipe["lrm"]["batch"])] + [
        base_example(rng) for _ in range(8)]), None),  # replay keeps BASE's skills
        recipe["lrm"], "LRM: worked arithmetic", tick=lambda: tick("lrm"))

    vlm = vlm_from_base(base, text, WORLD_VISION, [4, 6, 6], ids)
    digit_ids = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")))

    def toward_digit_embeddings(batch, digits):
        """Pull each visual token towards the text embedding of its digit (relative MSE)."""
        feats = torch.cat(vlm.model.get_image_features(batch["pixel_values"],
                                                       batch["image_grid_thw"]).pooler_output)
        target = vlm.model.language_model.embed_tokens.weight[digit_ids[digits]].detach()
        target = target.repeat_interleave(feats.shape[0] // len(digits), dim=0)
        return recipe["vision"]["align"] * ((feats - target) ** 2).sum(-1).mean() / (
            target ** 2).sum(-1).mean()

    vlm.requires_grad_(False)
    vlm.model.visual.requires_grad_(True)
    fit(vlm, vlm.model.visual.parameters(), lambda: image_batch(
        processor, rng, recipe["vision"]["batch"]), recipe["vision"],
        "VLM: vision tower, language model frozen", toward_digit_embeddings,
        tick=lambda: tick("vision"))
    vlm.requires_grad_(True)  # a short, gentle all-trainable stage: the VLM's own task vector
    fit(vlm, vlm.parameters(), lambda: image_batch(processor, rng, recipe["vlm"]["batch"]),
        recipe["vlm"], "VLM: all weights", tick=lambda: tick("vlm"))

    save_trio(root, tok, processor, base=base, lrm=lrm, vlm=vlm)
    ideal_composition(root)


def ideal_composition(world):
    """world/ideal, the ceiling a merge could reach: the VLM's vision tower and merger with the
    LRM's whole language model (embeddings, norms and lm_head included), no merging at all."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
    out = os.path.join(world, "ideal")
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{world}/vlm")
    lrm = Qwen2ForCausalLM.from_pretrained(f"{world}/lrm")
    vlm.model.language_model.load_state_dict(lrm.model.state_dict())
    vlm.lm_head.load_state_dict(lrm.lm_head.state_dict())
    vlm.save_pretrained(out)
    AutoProcessor.from_pretrained(f"{world}/vlm").save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# The experiment: every method of the miniature is one line of MINIATURE, scored by eval.py
# ----------------------------------------------------------------------------------------------

# Every grid is fixed here, before any score was seen, and is the same for every seed.
LAMBDAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # Task Arithmetic, and STAR, selective, TSV's alpha
THRESHOLDS = (0.1, 0.2, 0.3, 0.4)  # IP-Merging's T, at lam 1
# FRISM over alpha (as TA over lambda) and over its own lam, taken from the same lambda grid:
# its gates start at sigmoid(0) = 0.5, i.e. at Task Arithmetic lam / 2, and can reach lam.
FRISM_LAMS = (1.0, 2.0)
ALPHAS = (0.1, 1.0)
# Where the gates start: the paper's g = 0, and open (sigmoid(4) = 0.98, near TA at lam).
STARTS = {"": 0.0, "open ": 4.0}
# FRISM at the default alpha over a lam grid that holds twice every lambda of the scan's grid:
# what the lambda rule (README) is measured against.
LAM_GRID = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
FRISM_SETTINGS = ["--steps", "150", "--batch-size", "8", "--max-new-tokens", "16"]
ORACLE_CHAINS = 256  # labelled VL-reasoning chains on fresh images, for the oracle only
# The dual objective (ours) over beta, the text stream's weight, at each alpha, from each start and
# lam (as FRISM's lines), and over the lam grid; the LRM's answers are its whole chain (34 tokens).
BETAS = (0.3, 1.0, 3.0)
DUAL_SETTINGS = ["--max-new-tokens", "40"]
# (lam, alpha) of the dual lines: FRISM's, and alpha 0, to which the second-order reading pointed
# (Eq. 9's reward outweighs Eq. 8's curvature in nearly every direction; the oracle has no Eq. 9)
DUAL_SETTINGS_GRID = ((1.0, 0.1), (1.0, 1.0), (2.0, 0.1), (1.0, 0.0))
RANKS = (1, 4, 16, 64)  # truncated Task Arithmetic at lambda 1: the top k directions
BANDS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 128))  # injected alone, at each TA lambda
SHOWN = "FRISM lam=2.0 alpha=0.1"  # the run whose every gate is drawn
# The rows whose mean gate per band the gate picture sets beside the oracle's (lam 1)
GATE_ROWS = ("FRISM lam=1.0 alpha=0.1", "FRISM open lam=1.0 alpha=1.0",
             "entropy open lam=1.0 alpha=1.0", "dual lam=1.0 alpha=0.1 beta=1.0",
             "dual open lam=1.0 alpha=0.1 beta=1.0", "oracle lam=1.0", "oracle open lam=1.0")
MAX_NEW_TOKENS = 48  # the chain is 34 tokens and its end of turn: answers are scored complete


BENCHMARK_FILES = ("perception", "vl_reasoning", "text_reasoning", "marker_reasoning", "calib",
                   "text_prompts", "val_perception", "val_vl_reasoning")
TEXT_PROMPTS = 64  # the text stream of --objective dual: the LRM's own wording, no answers


def write_benchmarks(root, n, seed=1):
    """eval.py's local form: toy perception, toy VL reasoning, the LRM's skill in its own wording
    and in the form a VLM's language model sees (text only, for the world check); frism.py's
    label-free calibration set (questions and images, no answers) and text stream (reasoning
    prompts in the LRM's wording, no answers); and a held-out split of perception and VL
    reasoning items on which settings are chosen, never the benchmarks themselves."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)

    def image(name, d):
        draw_digit(d, rng).save(os.path.join(root, "images", name))
        return f"images/{name}"

    def perception(name):
        d = rng.randint(0, 9)
        return {"image": image(name, d), "kind": "perception",
                "question": perception_question(rng), "answer": d}

    def vl_reasoning(name):
        d = rng.randint(0, 9)
        return {"image": image(name, d), "kind": "reasoning", "question": VL_REASONING_QUESTION,
                "answer": 7 * d + 5}

    files = {name: [] for name in BENCHMARK_FILES}
    for i in range(n):
        files["perception"].append(perception(f"p{i}.png"))
        files["vl_reasoning"].append(vl_reasoning(f"r{i}.png"))
        d = rng.randint(0, 9)
        files["text_reasoning"].append({"kind": "reasoning", "answer": 7 * d + 5, "question":
                                        f"What number is this: {d}? {INSTRUCTION}"})
        d = rng.randint(0, 9)
        files["marker_reasoning"].append({"kind": "reasoning", "answer": 7 * d + 5,
                                          "question": f"{shown(d)}{VL_REASONING_QUESTION}"})
    for i in range(max(8, n // 3)):
        files["calib"].append({"image": image(f"c{i}.png", rng.randint(0, 9)),
                               "question": perception_question(rng)})
    for _ in range(4 if n < 8 else TEXT_PROMPTS):
        files["text_prompts"].append({"question": f"What number is this: {rng.randint(0, 9)}? "
                                                  f"{INSTRUCTION}"})
    for i in range(n):
        files["val_perception"].append(perception(f"vp{i}.png"))
        files["val_vl_reasoning"].append(vl_reasoning(f"vr{i}.png"))
    for name, items in files.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return {name: os.path.join(root, f"{name}.jsonl") for name in files}


def reasoning_chains(processor, n, seed):
    """The oracle's labels: VL-reasoning questions on fresh images with the worked chain as the
    answer (drawn from a seed no benchmark uses), as frism.py's teacher items."""
    import frism
    rng = random.Random(10_000 + seed)
    digits = [rng.randint(0, 9) for _ in range(n)]
    return [frism.Answer(draw_digit(d, rng), VL_REASONING_QUESTION,
                         processor.tokenizer(reason(d) + "<|im_end|>").input_ids) for d in digits]


def oracle(n, seed):
    """The ceiling of subspace gating here (ours): the same gates, trained on FRISM's KL plus the
    cross-entropy of n labelled VL-reasoning chains, labels FRISM does not have. A second data
    stream, so it is made by a factory: frism.main(argv, make_objective=oracle(...))."""
    import torch.nn.functional as F
    import frism

    def make_objective(model, processor, gated, answers, args):
        chains = reasoning_chains(processor, n, seed)
        data = frism.batches(len(chains), 8, seed)

        def objective(step):
            kl = frism.distill_loss(step.student_logp, step.teacher_logp)  # Eq. 8
            batch, mask = frism.make_batch(processor, [chains[i] for i in next(data)],
                                           model.device)
            targets = batch["input_ids"].roll(-1, dims=1)[mask]  # the token each position predicts
            ce = F.cross_entropy(frism.answer_logits(model, batch, mask), targets)
            return {"loss": kl + ce, "kl": kl, "chain_ce": ce}
        return objective
    return make_objective


class Seed:
    """What a row needs to be made in one seed's world: the three models, the calibration set,
    the text prompts. Each method returns (program, argv), --out still to come."""

    def __init__(self, world, data, seed, smoke):
        self.world, self.calib, self.text, self.seed, self.smoke = \
            world, data["calib"], data["text_prompts"], seed, smoke
        self.trio = ["--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base", f"{world}/base"]

    def baseline(self, method, *flags):
        import baselines
        return baselines.main, [method, *self.trio, *map(str, flags)]

    def frism(self, *flags):
        """frism.py without training (--no-train, --band, --rank): no calibration data."""
        import frism
        return frism.main, self.trio + list(map(str, flags))

    def train(self, *flags, make_objective=None):
        """frism.py's training, with the miniature's settings and calibration set."""
        import frism
        main = frism.main if make_objective is None else functools.partial(
            frism.main, make_objective=make_objective)
        return main, self.trio + FRISM_SETTINGS + [*map(str, flags), "--data", self.calib] + (
            ["--steps", "2"] if self.smoke else [])

    def dual(self, lam, alpha, beta, gate_init):
        """frism.py's training with the dual objective on the text prompts (ours)."""
        return self.train("--objective", "dual", "--text-data", self.text, "--lam", lam,
                          "--alpha", alpha, "--beta", beta, "--gate-init", gate_init,
                          *DUAL_SETTINGS)


class Line(NamedTuple):
    """One method at one setting over a grid of one knob: a row of the table per grid point, a
    line (or a point) on the plots."""
    label: str  # the legend, and a name for --only
    row: str  # each row's name, "{}" standing for its grid value
    grid: tuple  # the knob's values, in order ((None,): one row)
    make: Optional[Callable]  # (value, Seed) -> (program, argv); None: the VLM itself, no merge
    full: bool = False  # only with --full
    plots: tuple = ("tradeoff",)  # "tradeoff", "bands", "ranks", "lam" (the bands and lam
    # plots draw Task Arithmetic beside their own lines; the gate picture draws GATE_ROWS)
    style: str = "o-"  # matplotlib format on the trade-off plot
    colour: str = "tab:blue"
    knob: str = ""  # each point annotated "knob=value" on the trade-off plot
    validate: bool = False  # also scored on the held-out split, where its settings are chosen

    def rows(self):
        return {self.row.format(value): value for value in self.grid}


# The miniature: one line a method. A new method is one Line here (and its expectation in the
# toy test); the run, the tables, the plots, --only and the test all read this table.
MINIATURE = [
    Line("VLM alone", "VLM", (None,), None, style="s", colour="gray"),
    Line("Task Arithmetic", "TA {}", LAMBDAS, lambda lam, s: s.baseline("ta", "--lam", lam),
         knob="λ"),
    Line("TIES-Merging", "TIES", (None,), lambda _, s: s.baseline("ties"), style="D",
         colour="tab:purple"),
    Line("DARE", "DARE", (None,), lambda _, s: s.baseline("dare"), style="v", colour="tab:brown"),
    Line("IP-Merging", "IP T={}", THRESHOLDS, lambda t, s: s.baseline("ip", "--threshold", t),
         style="^-", colour="tab:green", knob="T"),
    *[Line(f"FRISM{', open start' if start else ''}, lam {lam}",
           f"FRISM {start}lam={lam} alpha={{}}", ALPHAS,
           lambda alpha, s, lam=lam, g0=g0: s.train("--lam", lam, "--alpha", alpha,
                                                    "--gate-init", g0),
           full=bool(start), plots=("tradeoff",), style="P:" if start else "*-",
           colour=colour, knob="α")
      for start, g0 in STARTS.items()
      for lam, colour in zip(FRISM_LAMS, ("darkred", "darkorange") if start else
                             ("tab:red", "tab:orange"))],
    *[Line(f"entropy objective{', open start' if start else ''}, lam {lam}",
           f"entropy {start}lam={lam} alpha={{}}", ALPHAS,
           lambda alpha, s, lam=lam, g0=g0: s.train("--objective", "entropy", "--lam", lam,
                                                    "--alpha", alpha, "--gate-init", g0),
           full=True, plots=("tradeoff",), style="X:" if start else "X-",
           colour=colour, knob="α")
      for start, g0 in STARTS.items()
      for lam, colour in zip(FRISM_LAMS, ("indigo", "mediumorchid") if start else
                             ("tab:cyan", "teal"))],
    Line("selective (λ grid)", "selective {}", LAMBDAS,
         lambda lam, s: s.baseline("selective", "--lam", lam), style="x--", colour="tab:olive"),
    Line("STAR (λ grid)", "STAR {}", LAMBDAS, lambda lam, s: s.baseline("star", "--lam", lam),
         style="x--", colour="lightseagreen"),
    Line("TSV (α grid)", "TSV {}", LAMBDAS, lambda alpha, s: s.baseline("tsv", "--alpha", alpha),
         style="x--", colour="tab:pink"),
    Line("oracle: the same gates trained WITH labels, open start", "oracle open lam={}",
         FRISM_LAMS, lambda lam, s: s.train("--lam", lam, "--gate-init", STARTS["open "],
                                            make_objective=oracle(8 if s.smoke else
                                                                  ORACLE_CHAINS, s.seed)),
         full=True, plots=("tradeoff",), style="*", colour="black", knob="lam"),
    Line("oracle, the paper's start", "oracle lam={}", FRISM_LAMS[:1],
         lambda lam, s: s.train("--lam", lam, "--gate-init", STARTS[""], make_objective=oracle(
             8 if s.smoke else ORACLE_CHAINS, s.seed)),
         full=True, plots=("tradeoff",), style="*", colour="dimgray", knob="lam"),
    *[Line(f"dual objective{', open start' if start else ''}, lam {lam}, alpha {alpha}",
           f"dual {start}lam={lam} alpha={alpha} beta={{}}", BETAS,
           lambda beta, s, lam=lam, alpha=alpha, g0=g0: s.dual(lam, alpha, beta, g0),
           full=True, plots=("tradeoff",), style="h:" if start else "h-",
           colour=colour, knob="β", validate=True)
      for start, g0 in STARTS.items()
      for (lam, alpha), colour in zip(DUAL_SETTINGS_GRID,
                                      ("forestgreen", "limegreen", "olive", "lime") if start else
                                      ("darkgreen", "seagreen", "yellowgreen", "springgreen"))],
    Line("dual objective, alpha 0.1, beta 1, over lam", "dual alpha=0.1 beta=1.0 lam={}",
         LAM_GRID, lambda lam, s: s.dual(lam, 0.1, 1.0, 0.0), full=True, plots=("lam",),
         colour="darkgreen", validate=True),
    Line("truncated Task Arithmetic, lambda 1", "TA top-{}", RANKS,
         lambda k, s: s.frism("--no-train", "--rank", k, "--lam", 1.0), full=True,
         plots=("ranks",)),
    *[Line(f"directions {a}-{b}", f"band {a}-{b} lam={{}}", LAMBDAS,
           lambda lam, s, a=a, b=b: s.frism("--no-train", "--band", a, b, "--lam", lam),
           full=True, plots=("bands",), colour=colour)
      for (a, b), colour in zip(BANDS, ("#440154", "#3b528b", "#21918c", "#5ec962", "#b5a300"))],
    Line("FRISM, alpha 0.1, over lam", "FRISM alpha=0.1 lam={}", LAM_GRID,
         lambda lam, s: s.train("--lam", lam, "--alpha", 0.1, "--gate-init", 0.0), full=True,
         plots=("lam",), colour="tab:red"),
]  # a new method: one Line above this one
TA = next(line for line in MINIATURE if line.row == "TA {}")  # what the bands and lam plots compare


def selected(only, full):
    """{row name: (its Line, its grid value)}: every row of the table, or those --only names
    (a Line's label, a row's name, or a pattern of row names such as 'entropy*')."""
    import fnmatch
    rows = {name: (line, value) for line in MINIATURE for name, value in line.rows().items()}
    if only is None:
        return {name: row for name, row in rows.items() if full or not row[0].full}
    chosen = {}
    for pattern in only:
        names = [name for name, (line, _) in rows.items()
                 if line.label == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not names:
            lines = "; ".join(f"{line.label}: {line.row.format('*')}" for line in MINIATURE)
            raise SystemExit(f"toy.py: --only {pattern!r} names no row of the miniature, whose "
                             f"lines are (label: rows) {lines}.")
        chosen.update({name: rows[name] for name in names})
    return chosen


def scan(world, data, out):
    """frism.py's label-free lambda scan over the TA grid, on the FRISM runs' calibration set:
    {"TA lam": KL}."""
    import frism
    argv = ["--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base", f"{world}/base",
            "--data", data["calib"], "--max-new-tokens", "16", "--batch-size", "8",
            "--out", out, "--overwrite", "--scan", *map(str, LAMBDAS)]
    if frism.main(argv):
        raise SystemExit("the lambda scan failed")
    with open(os.path.join(out, "frism_report.json")) as f:
        return {f"TA {row['lam']}": row["kl"] for row in json.load(f)["scan"]}


def spearman(x, y):
    """Rank correlation of two equally long lists (ties get their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else 0.0


def score(models, benchmarks, out, smoke=False):
    """{row name: {benchmark: score}} and the share of answers cut by the token limit, by eval.py
    (its own table is not printed: toy.py prints one table of every row)."""
    import eval as ev
    limit = 4 if smoke else MAX_NEW_TOKENS
    with contextlib.redirect_stdout(io.StringIO()):
        report = ev.run(ev.parse_args(["--models", *models.values(), "--benchmarks", *benchmarks,
                                       "--out", out, "--max-new-tokens", str(limit),
                                       "--batch-size", "50", "--device", "cpu"]))
    rows = {}
    for name, path in models.items():
        results = report["results"][path]
        rows[name] = {b: r["score"] for b, r in results.items() if r is not None}
        cut = [p["hit_token_limit"] for r in results.values() if r for p in r["predictions"]]
        rows[name]["cut_by_limit"] = 100.0 * sum(cut) / max(len(cut), 1)
    return rows


def world_check(world, data, runs, smoke=False):
    """Before any merge: can the LRM reason in both wordings, can the VLM read, and what does the
    ideal composition (VLM vision + the LRM's whole language model) reach?"""
    text = score({"LRM": f"{world}/lrm", "BASE": f"{world}/base"},
                 [data["text_reasoning"], data["marker_reasoning"]], f"{runs}/world_text.json", smoke)
    vision = score({"VLM": f"{world}/vlm", "ideal": f"{world}/ideal"},
                   [data["perception"], data["vl_reasoning"]], f"{runs}/world_vision.json", smoke)
    return {**text, **vision}


# ---- the cache: a world, or a row, is reused only if today's code would make it the same -----

# What a stage took on the 2-core machine of docs/miniature.md#time, in seconds: the weights of
# the progress bar over the whole run, whose rate then tells this machine's time remaining.
ESTIMATES = {"base": 0.077, "lrm": 0.12, "vision": 0.105, "vlm": 0.105,  # a world's step
             "world saved": 4.0, "world check": 2.3, "lambda scan": 0.8, "merge": 0.3,
             "training": 1.5, "training step": 0.03, "score": 0.7, "reading": 30.0}
CODE = ("frism.py", "baselines.py", "eval.py", "toy.py")  # what makes and scores a row


def digest(value):
    """A short fingerprint of anything JSON can write."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def source(file):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), file)) as f:
        return f.read()


def code_of(text):
    """What a source text does, as Python parses it: its comments and docstrings are not part
    of it, so a change to the words alone makes no cached world or row stale."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def world_recipe(seed, smoke):
    """What one seed's world is made from: its settings, the code that builds it (this file above
    the experiment's banner) and the libraries that run it."""
    import tokenizers
    import transformers
    import frism
    code = source("toy.py")
    return json.loads(json.dumps({
        "settings": {"seed": seed, "smoke": smoke, "stages": stages(smoke), "text": WORLD_TEXT,
                     "vision": WORLD_VISION, "merged": frism.MERGED},
        "code": digest(code_of(code[:code.index("\n# The experiment: ")])),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__}}))


def changed(made, now):
    """The keys whose values differ between two dicts, as a phrase."""
    keys = [k for k in now if not isinstance(made, dict) or made.get(k) != now[k]]
    return ", ".join(keys) + (" changed" if len(keys) != 1 else " changed")


def why_rebuild(world, recipe):
    """Why the cached world at `world` cannot be reused; None if it can. Only a directory that a
    finished build renamed into place holds world.json, so an interrupted one is never taken for
    a world."""
    import frism
    try:
        with open(os.path.join(world, "world.json")) as f:
            made = json.load(f)["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return "it is unfinished or unreadable (no readable world.json)"
    for part, why in (("settings", "it is from an older recipe"),
                      ("code", "it was built by another version of toy.py's world code"),
                      ("versions", "it was built with other library versions")):
        if not isinstance(made, dict) or made.get(part) != recipe[part]:
            return why + (f" ({changed(made.get(part), recipe[part])})" if part != "code" and
                          isinstance(made, dict) else "")
    for model in ("base", "lrm", "vlm", "ideal"):
        try:
            frism.check_files(os.path.join(world, model), model)
        except frism.InputError as e:
            return f"its {model} model is unreadable ({e})"
    return None


def remove_unfinished_worlds(root):
    """Worlds that a killed run left half-built (world.partial-PID-...): removed, in one line."""
    import frism
    pattern = re.compile(r"world\.partial-(\d+)-\w+")
    left = [entry for entry in sorted(os.listdir(root)) if pattern.fullmatch(entry)
            and not frism.process_alive(int(pattern.fullmatch(entry).group(1)))]
    for entry in left:
        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    if left:
        print(f"toy.py: removed {len(left)} world(s) that a stopped run left half-built in "
              f"{root}: {', '.join(left)}.")


def ensure_world(root, seed, smoke, progress=None):
    """Build one seed's world in a staging directory and rename it into place when it is
    complete: Ctrl-C or SIGKILL at any moment leaves the last finished world or none. The rows of
    the world it replaces go with it. Returns its stage times."""
    world = os.path.join(root, "world")
    os.makedirs(root, exist_ok=True)
    remove_unfinished_worlds(root)
    staging = tempfile.mkdtemp(prefix=f"world.partial-{os.getpid()}-", dir=root)
    TIMES.clear()
    try:
        tick = (lambda stage: progress.advance(ESTIMATES[stage])) if progress else None
        build_world(staging, smoke=smoke, seed=seed, **({"tick": tick} if tick else {}))
        with open(os.path.join(staging, "world.json"), "w") as f:
            json.dump({"recipe": world_recipe(seed, smoke), "seconds": TIMES}, f, indent=1)
        shutil.rmtree(os.path.join(root, "runs"), ignore_errors=True)
        shutil.rmtree(world, ignore_errors=True)
        os.replace(staging, world)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dict(TIMES)


def recall(path, key, parts=("world", "benchmarks", "code", "run")):
    """(the record at `path`, None) if it was made with these `parts` of `key`; else (None, why it
    must be made again), why being None where nothing was ever recorded."""
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            record = json.load(f)
        made = record["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "its record is unreadable"
    if "model" in record and not os.path.isdir(record["model"]):
        return None, "its model is missing"
    for part in parts:
        if made.get(part) != key[part]:
            return None, {"world": "made on another world", "benchmarks": "scored on other items",
                          "run": "made with other settings"}.get(part) or (
                "made by another version of " + ", ".join(
                    f for f in key["code"] if made.get("code", {}).get(f) != key["code"][f]))
    return record, None


def remember(path, key, record):
    """Write a record atomically: a killed run leaves the previous record or none, never half."""
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(record, key=key), f, indent=1)
    os.replace(tmp, path)


class Job(NamedTuple):
    """A stage of one seed that is not cached: what it makes, where its record goes, and its
    weight on the progress bar."""
    name: str
    path: str
    key: dict
    weight: float
    make: Callable  # () -> the record (a dict)


class Progress:
    """One bar over every stage the run makes (worlds, world checks, scans, rows), each weighing
    what it took on the machine of ESTIMATES: the bar's rate is this machine's against that one,
    and so is its estimate of the time left."""

    def __init__(self, total):
        self.bar = tqdm(total=total, desc="toy.py, every stage", position=0, disable=not total,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} so far, about "
                                   "{remaining} left{postfix}")

    def advance(self, seconds):
        self.bar.update(seconds)

    @contextlib.contextmanager
    def stage(self, name, weight):
        self.bar.set_postfix_str(name, refresh=True)
        done = self.bar.n
        yield
        self.bar.update(max(0.0, weight - (self.bar.n - done)))  # what the stage ticked counts once

    def close(self):
        self.bar.close()


def world_weight(smoke):
    return sum(stage["steps"] * ESTIMATES[name] for name, stage in stages(smoke).items()) + \
        ESTIMATES["world saved"]


def row_weight(program, argv):
    """A row's weight on the progress bar: a merge or a training run, then its scoring."""
    if program is None:
        return ESTIMATES["score"]
    if "--data" not in argv:  # training-free
        return ESTIMATES["merge"] + ESTIMATES["score"]
    steps = int(argv[len(argv) - 1 - argv[::-1].index("--steps") + 1])
    factor = 2.5 if isinstance(program, functools.partial) or "dual" in argv else 1.0  # 2 streams
    return ESTIMATES["training"] + factor * steps * ESTIMATES["training step"] + \
        ESTIMATES["score"] * (2 if "dual" in argv else 1)  # the held-out split too


def row_dir(name):
    return name.replace(" ", "_").replace("=", "-")


def make_row(name, program, argv, out, world, data, smoke, validate=False):
    """Merge (or, for the VLM alone, nothing), then score (and, for a line whose settings are
    chosen, score on the held-out split too): the row's record."""
    started = time.perf_counter()
    if program is None:
        model = f"{world}/vlm"
    elif code := program(argv + ["--out", out, "--overwrite"]):
        if code == 130:  # frism.py and baselines.py end a Ctrl-C with 130: so does toy.py
            raise KeyboardInterrupt
        raise SystemExit(f"toy.py: {name}: the merge failed")
    else:
        model = out
    merged = time.perf_counter()
    scores = score({name: model}, [data["perception"], data["vl_reasoning"]], f"{out}.eval.json",
                   smoke)[name]
    record = {"model": model, "scores": scores}
    if validate:
        val = score({name: model}, [data["val_perception"], data["val_vl_reasoning"]],
                    f"{out}.val.json", smoke)[name]
        record["val"] = {k.removeprefix("val_"): v for k, v in val.items()}
    seconds = {"merge": merged - started, "scoring": time.perf_counter() - merged}
    if os.path.isfile(os.path.join(out, "frism_report.json")):  # frism.py's own stage timer
        with open(os.path.join(out, "frism_report.json")) as f:
            seconds["lrm_answers"] = json.load(f)["seconds"].get("lrm_answers")
    return dict(record, seconds=seconds)


def stages_of(world, runs, data, seed, smoke):
    """{name: (weight on the progress bar, settings, make)}: every stage a seed's table can hold,
    in its order: the world check, the lambda scan, every row of MINIATURE, the reading."""
    inputs = Seed(world, data, seed, smoke)
    out = {"world check": (ESTIMATES["world check"], None,
                           lambda: {"check": world_check(world, data, runs, smoke)}),
           "lambda scan": (ESTIMATES["lambda scan"], None,
                           lambda: {"kl": scan(world, data, os.path.join(runs, "scan"))})}
    for name, (line, value) in selected(None, True).items():
        program, argv = line.make(value, inputs) if line.make else (None, None)
        out[name] = (row_weight(program, argv), argv, functools.partial(
            make_row, name, program, argv, os.path.join(runs, row_dir(name)), world, data,
            smoke, line.validate))
    out[READING_STAGE] = (ESTIMATES["reading"], list(READ_ROWS),
                          lambda: second_order_reading(world, data, runs, seed, smoke))
    return out


def plan(root, seed, args, rebuilt):
    """What this seed's run makes (Jobs, in the table's order) and what it reuses ({name: record}).
    A record is reused only if it was made on this world, on these items, by today's code, with
    these settings; else it is made again, and one line per reason says why. With --only the
    named rows are made, and every other stage recorded on this world is shown beside them,
    whoever made it (one line counts those that today's code would make otherwise)."""
    world, runs = os.path.join(root, "world"), os.path.join(root, "runs")
    data = {name: os.path.join(root, "benchmarks", f"{name}.jsonl") for name in BENCHMARK_FILES}
    common = {"world": digest(world_recipe(seed, args.smoke)),
              "benchmarks": {"items": 4 if args.smoke else args.items, "seed": seed + 1},
              "code": {file: digest(code_of(source(file))) for file in CODE}, "run": None}
    wanted = {"world check", "lambda scan", *selected(args.only, args.full)} | (
        {READING_STAGE} if args.full else set())  # what this run makes, if not cached
    jobs, reused, remade, others = [], {}, {}, {}
    named_rows = selected(args.only, True) if args.only is not None else {}
    for name, (weight, argv, make) in stages_of(world, runs, data, seed, args.smoke).items():
        path, key = os.path.join(runs, f"{row_dir(name)}.json"), dict(common, run=[
            name, *(argv or [])])
        named = name in named_rows
        if args.only is not None and not named:  # shown beside --only's rows, if recorded here
            record = None if rebuilt else recall(path, key, ("world", "benchmarks"))[0]
            if record is not None:
                reused[name] = record
                why = recall(path, key, ("code",))[1]
                if why:
                    others.setdefault(why, []).append(name)
                continue
        if name not in wanted and not named:
            continue
        record, why = (None, None) if rebuilt else recall(path, key)
        if record is not None and not named:
            reused[name] = record
            continue
        if why is not None and not named:
            remade.setdefault(why, []).append(name)
        jobs.append(Job(name, path, key, weight, make))
    for why, made in remade.items():
        print(f"toy.py: seed {seed}: making {len(made)} cached stage(s) again, {why}: "
              f"{', '.join(made[:3])}{', ...' if len(made) > 3 else ''}.")
    for why, shown in others.items():
        print(f"toy.py: seed {seed}: {len(shown)} cached stage(s) shown beside --only's rows "
              f"were {why}; python toy.py makes them again.")
    return jobs, reused, data


def one_seed(root, seed, args, jobs, reused, data, progress, world_times):
    """Write this seed's benchmarks, make its jobs (each recorded as soon as it is made, so that
    an interrupted run loses only the stage in progress), and gather its table."""
    runs = os.path.join(root, "runs")
    os.makedirs(runs, exist_ok=True)
    TIMES.clear()
    TIMES.update(world_times)
    write_benchmarks(os.path.join(root, "benchmarks"), 4 if args.smoke else args.items, seed + 1)
    records = dict(reused)
    for job in jobs:
        started = time.perf_counter()
        with progress.stage(f"seed {seed}: {job.name}", job.weight):
            record = job.make()
        remember(job.path, job.key, record)
        records[job.name] = record
        if "seconds" in record:  # a row: its merge (of it, the LRM's answers) and its scoring
            TIMES[f"merge {job.name}"] = record["seconds"]["merge"]
            if record["seconds"].get("lrm_answers"):
                TIMES[f"of it, LRM answers {job.name}"] = record["seconds"]["lrm_answers"]
            TIMES[f"scoring {job.name}"] = record["seconds"]["scoring"]
        else:
            TIMES[job.name] = time.perf_counter() - started
    check, kl = records.pop("world check")["check"], records.pop("lambda scan")["kl"]
    reading = records.pop(READING_STAGE, {}).get("reading")
    scores = {name: dict(records[name]["scores"]) for name in selected(None, True)
              if name in records}
    for name, value in kl.items():
        if name in scores:
            scores[name]["scan_kl"] = value
    measured = [name for name in kl if name in scores]  # the TA rows the scan also measured
    return {"seed": seed, "world_check": check, "rows": scores,
            "models": {name: records[name]["model"] for name in scores}, "scan_kl": kl,
            "val": {name: records[name]["val"] for name in scores if "val" in records[name]},
            "reading": reading and {k: v for k, v in reading.items() if k != "per_direction"},
            "reading_record": os.path.join(runs, f"{row_dir(READING_STAGE)}.json") if reading
            else None,
            "only": sorted(selected(args.only, True)) if args.only else None,
            "made": [job.name for job in jobs],
            "scan_spearman": spearman([kl[n] for n in measured],
                                      [scores[n]["perception"] for n in measured])
            if len(measured) > 1 else None,
            "lambda_rule": lambda_rule(kl, scores), "seconds": dict(TIMES)}


# ---- the paper's second-order reading, measured ----------------------------------------------

# Where it is measured: FRISM's start (the paper's g = 0, every gate at one half) at lam 1, on the
# calibration set; the rows whose learned gates it is set against, all from that start at lam 1.
READING = dict(lam=1.0, gate_init=0.0, draws=256, exact=48)
READING_STAGE = "second-order reading"  # its name among a seed's stages (--full)
READ_ROWS = ("FRISM lam=1.0 alpha=0.1", "FRISM lam=1.0 alpha=1.0", "entropy lam=1.0 alpha=0.1",
             "entropy lam=1.0 alpha=1.0", "oracle lam=1.0", "dual lam=1.0 alpha=0.1 beta=1.0",
             "dual lam=1.0 alpha=1.0 beta=1.0", "dual lam=1.0 alpha=0.0 beta=1.0")


def at_the_start(world, calib, lam, gate_init):
    """frism.py's run up to its first training step: the VLM with every merged layer gated at its
    start, and the teacher's answers to the calibration set."""
    import frism
    args = frism.parse_args(["--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base",
                             f"{world}/base", "--out", "unused", "--data", calib, *FRISM_SETTINGS,
                             "--lam", str(lam), "--gate-init", str(gate_init)])
    model, processor = frism.load_vlm(f"{world}/vlm", args.dtype, args.device)
    model.set_attn_implementation("eager")  # exact_curvature differentiates twice
    gated = frism.inject(model, frism.safetensors_index(f"{world}/lrm", "--lrm"),
                         frism.safetensors_index(f"{world}/base", "--base"), args)
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    return model, processor, gated, answers


@contextlib.contextmanager
def gates_set_to(gated, sigma):
    """Eq. 7 with every layer's gates set to sigma[path], of any shape that broadcasts against
    (items, tokens, directions): (items, 1, r) gives each item of a batch gates of its own."""
    for path, layer in gated.items():
        layer.effective_S = functools.partial(torch.mul, sigma[path], layer.S)
    try:
        yield
    finally:
        for layer in gated.values():
            del layer.effective_S


def curvature(model, processor, gated, answers, start, draws, seed):
    """h_i, the Gauss-Newton curvature of Eq. 8 in each direction's gate sigma_i at `start` (the
    gates' values, by layer): the Fisher information of p_merged in sigma_i summed over the answer
    positions, over their number (Eq. 8's token mean). At the VLM (every gate closed) it is Eq. 8's
    Hessian; elsewhere it leaves out the part that grows with the distance between the merged
    model and the VLM (exact_curvature measures both). A Monte Carlo estimate: each draw samples
    every answer token from p_merged and backpropagates its log-probability to gates of which
    each item has its own copy; the squares of the items' gradients, summed, estimate it without
    bias (two positions' cross terms have mean zero). Returns (h, its standard error), by layer."""
    import frism
    batch, mask = frism.make_batch(processor, answers, model.device)
    sigma = {path: start[path].expand(len(answers), 1, -1).clone().requires_grad_(True)
             for path in gated}
    generator, estimates = torch.Generator().manual_seed(seed), []
    with gates_set_to(gated, sigma):
        logp = frism.answer_logp(model, batch, mask)
        for k in range(draws):
            y = torch.multinomial(logp.detach().exp(), 1, generator=generator)
            grads = torch.autograd.grad(logp.gather(1, y).sum(), list(sigma.values()),
                                        retain_graph=k < draws - 1)
            estimates.append([(g[:, 0] ** 2).sum(0) for g in grads])
    tokens = mask.sum().item()
    by_layer = [torch.stack(per_draw) / tokens for per_draw in zip(*estimates)]
    return ({path: e.mean(0) for path, e in zip(sigma, by_layer)},
            {path: e.std(0) / draws ** 0.5 for path, e in zip(sigma, by_layer)})


def exact_curvature(model, processor, gated, answers, start, directions):
    """Eq. 8 at `start` differentiated twice, exactly (double backward), in each (path, i) of
    `directions`: the Hessian's diagonal there; and Eq. 8's gradient in every gate."""
    import frism
    batch, mask = frism.make_batch(processor, answers, model.device)
    with torch.no_grad(), frism.deltas_off(gated):
        teacher = frism.answer_logp(model, batch, mask)
    sigma = {path: start[path].clone().requires_grad_(True) for path in gated}
    with gates_set_to(gated, sigma):
        kl = frism.distill_loss(frism.answer_logp(model, batch, mask), teacher)
        grads = dict(zip(sigma, torch.autograd.grad(kl, list(sigma.values()), create_graph=True)))
        hessian = [torch.autograd.grad(grads[path][i], sigma[path], retain_graph=True)[0][i].item()
                   for path, i in directions]
    return hessian, {path: g.detach() for path, g in grads.items()}


def second_order_reading(world, data, runs, seed, smoke):
    """The paper's reading, dL/dsigma_i ~ (h_i - 2 alpha ||B_i||^2) sigma_i with Eq. 9 normalised
    (||B_i||^2 = S_i^2 / sum S^2): a gate closes where the vision curvature h_i exceeds the
    injection benefit 2 alpha S_i^2 / sum S^2. Measured per direction at FRISM's start, set
    against Eq. 10's exact first step and the gates that READ_ROWS learned from that start."""
    model, processor, gated, answers = at_the_start(world, data["calib"], READING["lam"],
                                                    READING["gate_init"])
    start = {path: layer.gates() for path, layer in gated.items()}
    h, se = curvature(model, processor, gated, answers, start, 4 if smoke else READING["draws"],
                      seed)
    rng = random.Random(seed)
    directions = [(path, rng.randrange(len(gated[path].S)))
                  for path in rng.choices(list(gated), k=2 if smoke else READING["exact"])]
    exact, grad = exact_curvature(model, processor, gated, answers, start, directions)
    flat = lambda d: torch.cat([d[path].flatten().float() for path in gated])  # noqa: E731
    h_, se_, grad_ = flat(h), flat(se), flat(grad)
    S2 = torch.cat([gated[path].S ** 2 for path in gated])
    share = S2 / S2.sum()  # ||B_i||^2 in Eq. 9's normalisation
    sigma0 = flat(start)
    out = {"lam": READING["lam"], "start": sigma0[0].item(), "directions": len(h_),
           "relative_se": (se_ / h_.clamp_min(1e-30)).median().item(),
           "exact": {"h": [h_[index(gated, path, i)].item() for path, i in directions],
                     "hessian": exact, "benefit": [2 * 0.1 * share[index(gated, path, i)].item()
                                                   for path, i in directions]},
           "per_direction": {"h": h_.tolist(), "share": share.tolist(), "gates": {}},
           "alphas": {}}
    for alpha in ALPHAS:
        benefit = 2 * alpha * share
        predicted_open = h_ < benefit
        first_step_opens = grad_ - benefit * sigma0 < 0  # dEq.10/dsigma_i at the start, exactly
        out["alphas"][str(alpha)] = {
            "predicted_open": predicted_open.float().mean().item(),
            "predicted_open_energy": share[predicted_open].sum().item(),
            "first_step_agrees": (first_step_opens == predicted_open).float().mean().item()}
    for name in READ_ROWS:
        record = os.path.join(runs, f"{row_dir(name)}.json")
        if not os.path.exists(record):
            continue
        with open(record) as f:
            learned = flat(saved_gates(json.load(f)["model"]))
        out["per_direction"]["gates"][name] = learned.tolist()
        opened = learned > sigma0
        alpha = next((a for a in ALPHAS if f"alpha={a}" in name), None)
        row = {"opened": opened.float().mean().item(), "opened_energy": share[opened].sum().item()}
        if alpha is not None:
            predicted_open = h_ < 2 * alpha * share
            row["agrees"] = (opened == predicted_open).float().mean().item()
            row["agrees_energy"] = share[opened == predicted_open].sum().item()
        out.setdefault("rows", {})[name] = row
    gates = out["per_direction"]["gates"]
    if "oracle lam=1.0" in gates and "FRISM lam=1.0 alpha=0.1" in gates:
        oracle, frism_ = torch.tensor(gates["oracle lam=1.0"]), torch.tensor(
            gates["FRISM lam=1.0 alpha=0.1"])
        apart = (oracle > sigma0) & (frism_ < sigma0)  # the oracle opens, FRISM closes
        ratio = (h_ / (2 * 0.1 * share)).log10()
        out["oracle_opens_frism_closes"] = {
            "directions": int(apart.sum()), "energy": share[apart].sum().item(),
            "predicted_closed": (ratio[apart] > 0).float().mean().item() if apart.any() else None,
            "median_log10_h_over_benefit": ratio[apart].median().item() if apart.any() else None,
            "median_log10_h_over_benefit_elsewhere": ratio[~apart].median().item()}
    return {"reading": out}


def index(gated, path, i):
    """The position of direction i of layer `path` among every direction, in gated's order."""
    offset = 0
    for p, layer in gated.items():
        if p == path:
            return offset + i
        offset += len(layer.S)
    raise KeyError(path)

def rule_pick(kl):
    """The lambda rule the README gave until it was measured, read from a scan ({"TA lam": KL}):
    the KL "rises steeply" at the first lambda whose rise (KL minus the previous lambda's) is at
    least twice the rise before it; the rule picks lam = twice the lambda before that (twice the
    largest lambda scanned if the KL never rises so). Returns (steep lambda or None, the pick)."""
    points = sorted((float(name.split()[1]), value) for name, value in kl.items())
    rises = [b[1] - a[1] for a, b in zip(points, points[1:])]
    for i in range(1, len(rises)):
        if rises[i] >= 2 * rises[i - 1]:
            return points[i + 1][0], 2 * points[i][0]
    return None, 2 * points[-1][0]


def lambda_rule(kl, scores):
    """Where the scan rises steeply, the old rule's pick and FRISM there (alpha 0.1, the paper's
    start), and FRISM's best VL reasoning over LAM_GRID (ties: more perception), where those rows
    were run."""
    steep, pick = rule_pick(kl) if kl else (None, None)
    out = {"steep_at": steep, "pick": pick}
    grid = {lam: scores.get(f"FRISM alpha=0.1 lam={lam}") for lam in LAM_GRID}
    if all(grid.values()):
        best = max(LAM_GRID, key=lambda lam: (grid[lam]["vl_reasoning"], grid[lam]["perception"]))
        out["at_pick"] = grid.get(pick)
        out["best"] = dict(grid[best], lam=best)
        out["grid"] = {str(lam): grid[lam] for lam in LAM_GRID}
    return out


def spread(summaries, part):
    """{row: {column: (mean, min, max)}} over the seeds, for the rows every seed has."""
    out = {}
    for name in summaries[0][part]:
        if not all(name in s[part] for s in summaries):
            continue
        columns = summaries[0][part][name]
        out[name] = {c: (sum(s[part][name][c] for s in summaries) / len(summaries),
                         min(s[part][name][c] for s in summaries),
                         max(s[part][name][c] for s in summaries)) for c in columns}
    return out


def cell(value):
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        mean, low, high = value
        return f"{mean:.1f}" if low == high else f"{mean:.1f} ({low:.0f}-{high:.0f})"
    return f"{value:.1f}"


def print_table(title, rows, columns):
    names = {"text_reasoning": "text form", "marker_reasoning": "marker form",
             "perception": "perception", "vl_reasoning": "VL reasoning",
             "cut_by_limit": "cut (%)", "scan_kl": "scan KL"}
    width = max(len(n) for n in rows) + 2
    print(f"\n{title}\n{'model':{width}s}" + "".join(f"{names[c]:>20s}" for c in columns))
    for name, row in rows.items():
        print(f"{name:{width}s}" + "".join(f"{cell(row.get(c)):>20s}" for c in columns))


def print_rule(summaries):
    """Per seed: where the scan's KL rises steeply, the lam the old README rule picks (twice the
    lambda before that) and FRISM there, and FRISM's best VL reasoning over the lam grid."""
    print("\nChoosing lam, per seed (FRISM at alpha 0.1 from the paper's start; perception / VL "
          "reasoning): the scan's steep rise / the rule 'twice the lambda before it' / FRISM's "
          "best over the lam grid")
    for s in summaries:
        r = s["lambda_rule"]
        at, best = r.get("at_pick"), r.get("best")
        print(f"  seed {s['seed']}: steep at {r['steep_at']} / lam {r['pick']}: " +
              (f"{at['perception']:.0f} / {at['vl_reasoning']:.0f}" if at else "-") + " / " +
              (f"lam {best['lam']}: {best['perception']:.0f} / {best['vl_reasoning']:.0f} "
               f"({best['lam'] / r['steep_at']:.1f} x the steep lambda)" if best and r["steep_at"]
               else "- (the lam grid runs with --full)"))


def choose(seed_summary, start):
    """The dual row of one start (a tag of STARTS) that the held-out split chooses, beta, alpha
    and lam together: the most perception plus VL reasoning there (ours: the two axes weigh the
    same). None where no dual row of that start was made."""
    def of_start(name):
        return name.startswith("dual ") and name.startswith("dual open ") == (start == "open ")
    rows = {name: val for name, val in seed_summary["val"].items() if of_start(name)}
    if not rows:
        return None
    name = max(rows, key=lambda n: (rows[n]["perception"] + rows[n]["vl_reasoning"], n))
    return {"row": name, "val": rows[name], "test": seed_summary["rows"][name]}


def chosen_rows(chosen):
    """The dual objective's rows as chosen on the held-out split, one a start, as rows of the
    table (mean, min-max over the seeds of the chosen rows' scores on the benchmarks)."""
    return {f"dual {start}(chosen on the held-out split)": spread(
        [{"rows": {"chosen": pick["test"]}} for pick in picks], "rows")["chosen"]
        for start, picks in chosen.items() if all(picks)}


def print_choice(chosen):
    for start, picks in chosen.items():
        if not all(picks):
            continue
        test = chosen_rows({start: picks})[f"dual {start}(chosen on the held-out split)"]
        where = "open gates" if start else "the paper's start"
        print(f"\nThe dual objective from {where}, beta, alpha and lam chosen on the held-out "
              f"split in each seed "
              f"({'; '.join(pick['row'] for pick in picks)}): perception "
              f"{cell(test['perception'])}, VL reasoning {cell(test['vl_reasoning'])}")


def print_reading(summaries):
    """Per seed: the second-order reading against Eq. 10's first step and the learned gates."""
    for s in summaries:
        r = s.get("reading")
        if not r:
            continue
        exact = r["exact"]
        ratios = sorted(h / e for h, e in zip(exact["h"], exact["hessian"]) if e > 0)
        below = sum(e < b for e, b in zip(exact["hessian"], exact["benefit"]))
        print(f"\nThe second-order reading, seed {s['seed']} (lam {r['lam']}, every gate at "
              f"{r['start']:.2f}; {r['directions']} directions; h_i: Gauss-Newton curvature of "
              f"Eq. 8, median relative standard error {r['relative_se']:.2f}; against the exact "
              f"Hessian on {len(exact['h'])} directions, median ratio "
              f"{ratios[len(ratios) // 2] if ratios else float('nan'):.2f}, and the exact Hessian "
              f"below the benefit at alpha 0.1 on {below} of them)")
        for alpha, a in r["alphas"].items():
            print(f"  alpha {alpha}: predicted open {100 * a['predicted_open']:.1f} % of the "
                  f"directions ({100 * a['predicted_open_energy']:.1f} % of the energy); Eq. 10's "
                  f"exact first step agrees on {100 * a['first_step_agrees']:.1f} %")
        for name, row in r.get("rows", {}).items():
            agrees = (f", agrees with the prediction on {100 * row['agrees']:.1f} % "
                      f"({100 * row['agrees_energy']:.1f} % of the energy)" if "agrees" in row
                      else "")
            print(f"  {name:34s} opened {100 * row['opened']:5.1f} % "
                  f"({100 * row['opened_energy']:.1f} % of the energy){agrees}")
        apart = r.get("oracle_opens_frism_closes")
        if apart and apart["directions"]:
            print(f"  the oracle opens and FRISM (alpha 0.1) closes {apart['directions']} "
                  f"directions ({100 * apart['energy']:.1f} % of the energy): "
                  f"{100 * apart['predicted_closed']:.0f} % predicted closed; median "
                  f"log10(h / benefit) {apart['median_log10_h_over_benefit']:.2f} there, "
                  f"{apart['median_log10_h_over_benefit_elsewhere']:.2f} elsewhere")

def print_times(summaries):
    """Where the time went, per seed: each stage of the world (when it was built), the lambda
    scan, each merge (grouped by kind), each scoring."""
    for s in summaries:
        groups = {}
        for name, seconds in s["seconds"].items():
            key = re.sub(r" [\d.=-]+|[=-][\d.]+", "", name) if name.startswith(
                ("merge ", "scoring ", "of it, ")) else name
            count, total = groups.get(key, (0, 0.0))
            groups[key] = (count + 1, total + seconds)
        print(f"\nTime, seed {s['seed']} ({sum(s['seconds'].values()):.0f} s in all)")
        for key, (count, total) in groups.items():
            print(f"  {key:55s} {total:7.1f} s" + (f"  ({count} runs)" if count > 1 else ""))


def lines_in(table, figure):
    """The lines of MINIATURE that `figure` draws and that have every row in the table."""
    return [line for line in MINIATURE if figure in line.plots
            and all(name in table for name in line.rows())]


def plot(table, check, summaries, out_dir):
    """The paper's Fig. 2 in miniature (every method, min-max over seeds as error bars), its
    Fig. 3 in miniature (bands of singular directions against lambda, with --full), FRISM
    against its lam, and the gates: which subspaces each objective opened, against the oracle."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots.")
        return []
    paths = [tradeoff_plot(plt, table, check, len(summaries), out_dir)]
    if lines_in(table, "bands"):
        paths.append(bands_plot(plt, table, len(summaries), out_dir))
    if lines_in(table, "lam"):
        paths.append(lam_plot(plt, table, summaries, out_dir))
    if SHOWN in summaries[0]["models"]:
        paths.append(gates_plot(plt, table, summaries, out_dir))
    if summaries[0].get("reading_record"):
        paths.append(curvature_plot(plt, summaries[0], out_dir))
    return paths


def saved(plt, fig, path, dpi):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def errorbars(ax, table, names, style, color, label, labels=None, x="perception",
              y="vl_reasoning"):
    points = [table[n] for n in names]
    xs, ys = ([p[c][0] for p in points] if isinstance(c, str) else list(c) for c in (x, y))
    err = lambda c: None if not isinstance(c, str) else [[p[c][0] - p[c][1] for p in points],
                                                          [p[c][2] - p[c][0] for p in points]]
    ax.errorbar(xs, ys, xerr=err(x), yerr=err(y), fmt=style, color=color, label=label,
                capsize=2, markersize=7)
    for xi, yi, text in zip(xs, ys, labels or []):
        ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6,
                    color=color)


def tradeoff_plot(plt, table, check, seeds, out_dir):
    fig, ax = plt.subplots(figsize=(8, 6))
    for line in lines_in(table, "tradeoff"):
        rows = line.rows()
        errorbars(ax, table, list(rows), line.style, line.colour, line.label,
                  [f"{line.knob}={value}" for value in rows.values()] if line.knob else None)
    ax.axhline(check["ideal"]["vl_reasoning"][0], color="gray", ls=":", lw=1,
               label="ideal composition")
    ax.set_xlabel("toy perception accuracy (%)")
    ax.set_ylabel("toy VL reasoning accuracy (%)")
    ax.set_title(f"Reasoning against perception (toy world, {seeds} seed(s))")
    ax.legend(fontsize=6, loc="best")
    return saved(plt, fig, os.path.join(out_dir, "tradeoff.png"), 120)


def bands_plot(plt, table, seeds, out_dir):
    """Each band of singular directions injected alone in every layer, against lambda, beside
    Task Arithmetic; and truncated Task Arithmetic against k."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    for ax, column in zip(axes, ("perception", "vl_reasoning")):
        for line in lines_in(table, "bands"):
            errorbars(ax, table, list(line.rows()), "o-", line.colour, line.label,
                      x=line.grid, y=column)
        errorbars(ax, table, list(TA.rows()), "o--", "black", "all (TA)", x=TA.grid, y=column)
    for ax, column in zip(axes, ("perception", "vl_reasoning")):
        ax.set_xlabel("lambda")
        ax.set_ylabel(f"toy {column.replace('_', ' ')} (%)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("perception, one band injected")
    axes[1].set_title("VL reasoning, one band injected")
    for line in lines_in(table, "ranks"):
        errorbars(axes[2], table, list(line.rows()), "o-", "tab:blue", "perception",
                  x=line.grid, y="perception")
        errorbars(axes[2], table, list(line.rows()), "s-", "tab:red", "VL reasoning",
                  x=line.grid, y="vl_reasoning")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("k (top-k directions of every layer), lambda 1")
    axes[2].set_title("truncated Task Arithmetic")
    if lines_in(table, "ranks"):
        axes[2].legend(fontsize=7)
    fig.suptitle(f"Which singular directions do what (toy world, {seeds} seed(s))")
    return saved(plt, fig, os.path.join(out_dir, "bands.png"), 110)


def lam_plot(plt, table, summaries, out_dir):
    """FRISM against its lam, beside Task Arithmetic against lambda, with the lambda where each
    seed's scan rises steeply."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, column in zip(axes, ("perception", "vl_reasoning")):
        for line in lines_in(table, "lam") + [TA]:
            errorbars(ax, table, list(line.rows()), line.style, line.colour, line.label,
                      x=line.grid, y=column)
        for s in summaries:
            if s["lambda_rule"]["steep_at"]:
                ax.axvline(s["lambda_rule"]["steep_at"], color="gray", ls=":", lw=1)
        ax.set_xlabel("lam (FRISM) or lambda (Task Arithmetic)")
        ax.set_ylabel(f"toy {column.replace('_', ' ')} (%)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("perception (dotted: each seed's steep rise of the scan's KL)")
    axes[1].set_title("VL reasoning")
    fig.suptitle(f"Choosing lam (toy world, {len(summaries)} seed(s))")
    return saved(plt, fig, os.path.join(out_dir, "lam.png"), 110)


def saved_gates(run):
    """{module path: the gate of every direction}, as the run's gated layers defined it (frism.py
    writes layer.gates(), S_eff / S, into frism_gate_values.safetensors)."""
    from safetensors.torch import load_file
    return load_file(os.path.join(run, "frism_gate_values.safetensors"))


def gates_plot(plt, table, summaries, out_dir):
    """Left: every gate of one FRISM run. Right: per band, the mean gate of every trained row at
    lam 1 (FRISM and the entropy objective from each start, the oracle), over the seeds."""
    models = summaries[0]["models"]
    gates = saved_gates(models[SHOWN])
    names = sorted(gates, key=lambda p: (int(p.split(".layers.")[1].split(".")[0]),
                                         MERGED_ORDER.index(p.rsplit(".", 1)[1])))
    grid = torch.full((len(names), max(len(g) for g in gates.values())), float("nan"))
    for row, path in enumerate(names):
        grid[row, :len(gates[path])] = gates[path]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    image = left.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                        interpolation="nearest")
    left.set_yticks(range(len(names)), [f"L{p.split('.layers.')[1].split('.')[0]} "
                                        f"{p.rsplit('.', 1)[1]}" for p in names], fontsize=6)
    left.set_xlabel("singular direction (descending S; k and v have fewer)")
    left.set_title(f"gate (S_eff / S), {SHOWN}, seed {summaries[0]['seed']}")
    fig.colorbar(image, ax=left, fraction=0.03)
    lam = FRISM_LAMS[0]
    rows = [name for name in GATE_ROWS if all(name in s["models"] for s in summaries)]
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        layers = [g for s in summaries for g in saved_gates(s["models"][row]).values()]
        means = []
        for a, b in BANDS:  # mean gate of the band's directions, over layers and seeds
            values = torch.cat([g[a - 1:b] for g in layers])
            means.append(values.mean().item() if len(values) else float("nan"))
        right.bar([k + i * width for k in range(len(BANDS))], means, width, label=row)
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(BANDS))],
                     [f"{a}-{b}" for a, b in BANDS])
    right.set_xlabel("singular directions (band)")
    right.set_ylabel("mean gate (S_eff / S)")
    right.set_ylim(0, 1)
    right.set_title(f"mean gate per band, lam {lam} ({len(summaries)} seed(s))")
    right.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return saved(plt, fig, os.path.join(out_dir, "gates.png"), 110)


def curvature_plot(plt, seed_summary, out_dir):
    """The second-order reading of one seed, direction by direction: the vision curvature h_i
    against the injection benefit 2 alpha S_i^2 / sum S^2 (alpha 0.1), each direction coloured by
    the gate a row learned from the same start; above the diagonal, the reading closes it (at
    alpha 1, above the dashed line)."""
    with open(seed_summary["reading_record"]) as f:
        reading = json.load(f)["reading"]
    h = torch.tensor(reading["per_direction"]["h"]).clamp_min(1e-12)
    benefit = 2 * 0.1 * torch.tensor(reading["per_direction"]["share"]).clamp_min(1e-12)
    learned = reading["per_direction"]["gates"]
    shown = [name for name in ("oracle lam=1.0", "FRISM lam=1.0 alpha=0.1") if name in learned]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(6.5 * max(len(shown), 1), 5.5),
                             squeeze=False)
    low, high = min(h.min(), benefit.min()).item(), max(h.max(), benefit.max()).item()
    for ax, name in zip(axes[0], shown or [None]):
        colour = learned[name] if name else None
        points = ax.scatter(benefit, h, c=colour, cmap="viridis", vmin=0, vmax=1, s=4)
        ax.plot([low, high], [low, high], color="black", lw=1, label="h = benefit (alpha 0.1)")
        ax.plot([low, high], [10 * low, 10 * high], color="black", lw=1, ls="--",
                label="h = benefit (alpha 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("injection benefit 2 alpha S_i^2 / sum S^2, alpha 0.1")
        ax.set_ylabel("vision curvature h_i (Gauss-Newton, Eq. 8)")
        ax.set_title(f"coloured by {name}'s learned gate" if name else "no learned gates")
        ax.legend(fontsize=7, loc="upper left")
        if name:
            fig.colorbar(points, ax=ax, fraction=0.04, label="learned gate (start 0.5)")
    fig.suptitle(f"The second-order reading, seed {seed_summary['seed']}: above the line the "
                 f"paper's reading closes a direction")
    return saved(plt, fig, os.path.join(out_dir, "curvature.png"), 110)

MERGED_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    import frism
    p = argparse.ArgumentParser(description="Build the toy world (cached) and compare Task "
                                "Arithmetic, the baselines and FRISM in it, offline, on the CPU.",
                                formatter_class=frism.HelpWithDefaults)
    p.add_argument("--dir", default="toy_world", help="where the worlds, merges and plots go")
    p.add_argument("--seeds", type=int, default=1,
                   help="build this many worlds (seeds 0..N-1, each cached) and report the mean "
                        "and min-max of every figure")
    p.add_argument("--rebuild", action="store_true", help="retrain the worlds even if cached")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps of everything: checks the pipeline, shows nothing")
    p.add_argument("--items", type=int, default=100, help="items per toy benchmark")
    p.add_argument("--full", action="store_true", help="also the rows marked full in MINIATURE: "
                   "FRISM from open gates, the entropy objective, the oracle (gates trained with "
                   "labels), FRISM over a lam grid, truncated Task Arithmetic and bands of "
                   "singular directions (about 15 more minutes a seed)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="make and score only these rows (a "
                   "line's label, a row's name, or a pattern such as 'entropy*'), full or not, "
                   "and show them beside every row cached on the same worlds")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.items < 1:
        p.error("--seeds and --items must be positive")
    if args.only and (args.full or args.rebuild):
        p.error("--only runs the named rows on the cached worlds: --full and --rebuild have no "
                "effect with it")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        for bar in list(tqdm._instances):  # every bar closed first: this line is the last
            bar.close()
        print("toy.py: interrupted; every finished world and row stays cached, and the next run "
              "goes on from there.", file=sys.stderr)
        return 130


def run(args):
    """Plan every seed (what is cached, what must be made), build the worlds, make the rows,
    print the tables and the stage timer, save the summary and the plots."""
    selected(args.only, args.full)  # an unknown --only name is refused before any work
    started = time.time()
    roots = [os.path.join(args.dir, f"seed-{seed}") for seed in range(args.seeds)]
    builds = {}  # the seeds whose world is built in this run, and why
    for seed, root in enumerate(roots):
        world = os.path.join(root, "world")
        why = "--rebuild" if args.rebuild else None if not os.path.exists(world) else \
            why_rebuild(world, world_recipe(seed, args.smoke))
        if os.path.exists(world) and why is None:
            continue
        builds[seed] = why
        minutes = f"about {world_weight(args.smoke) / 60:.0f} minutes on a 2-core CPU"
        if args.only and why is None:
            print(f"toy.py: --only runs on cached worlds, and none is cached for seed {seed} in "
                  f"{root}: building it first ({minutes}).")
        elif why is not None:
            print(f"toy.py: seed {seed}: building its world again ({minutes}): {why}.")
    plans = [plan(root, seed, args, seed in builds) for seed, root in enumerate(roots)]
    progress = Progress(len(builds) * world_weight(args.smoke) +
                        sum(job.weight for jobs, _, _ in plans for job in jobs))
    # Every world first: frism.py fixes glibc's mmap threshold for the rest of the process (see
    # frism.frugal_host_memory), which slows the many small allocations of training a world.
    world_times = {}
    for seed in builds:
        with progress.stage(f"seed {seed}: world", world_weight(args.smoke)):
            world_times[seed] = ensure_world(roots[seed], seed, args.smoke, progress)
    summaries = [one_seed(root, seed, args, *plans[seed], progress, world_times.get(seed, {}))
                 for seed, root in enumerate(roots)]
    progress.close()
    check, table = spread(summaries, "world_check"), spread(summaries, "rows")
    print_table(f"World check ({args.seeds} seed(s); mean, min-max in brackets)", check,
                ("text_reasoning", "marker_reasoning", "perception", "vl_reasoning"))
    print_table(f"Merges ({args.seeds} seed(s); mean, min-max in brackets)", table,
                ("perception", "vl_reasoning", "cut_by_limit", "scan_kl"))
    if args.only:
        print(f"(--only: {len(selected(args.only, True))} row(s) made now; every other row is "
              f"the one cached in {os.path.join(args.dir, 'seed-N', 'runs')})")
    rho = [s["scan_spearman"] for s in summaries]
    print(f"\nLambda scan: rank correlation of its KL with TA's perception over the TA grid, per "
          f"seed: {', '.join('-' if r is None else f'{r:.2f}' for r in rho)}")
    print_rule(summaries)
    print_reading(summaries)
    chosen = {start: [choose(s, start) for s in summaries] for start in STARTS}
    print_choice(chosen)
    print_times(summaries)
    summary = {"seeds": args.seeds, "items": args.items, "full": args.full, "only": args.only,
               "world_check": check, "rows": table, "scan_spearman": rho,
               "lambda_rule": [s["lambda_rule"] for s in summaries],
               "chosen": {start or "paper": picks for start, picks in chosen.items()},
               "chosen_rows": chosen_rows(chosen),
               "per_seed": summaries}
    with open(os.path.join(args.dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for path in plot(table, check, summaries, args.dir):
        print(f"plot: {path}")
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
