"""The paper in miniature: a base / LRM / VLM world small enough to build on a laptop, offline.

`python toy.py` trains, from scratch and on the CPU, three models of the real Hugging Face
classes (`Qwen2ForCausalLM`, `Qwen2_5_VLForConditionalGeneration`, a byte-level tokenizer
trained with `tokenizers`, a real `Qwen2_5_VLProcessor`):

  BASE  a tiny LLM that knows the chat format and can copy a number from its context;
  LRM   BASE fine-tuned on text-only worked arithmetic ("6 x 7 = 42. 42 + 5 = 47.");
  VLM   BASE's weights as its language model, a vision tower trained to read a drawn digit.

It then writes the toy benchmarks (perception: read the digit; VL reasoning: needs both, "multiply
the number shown by 7 and add 5"), makes every row of MINIATURE (one Line a method: Task
Arithmetic, the baselines, FRISM, ... each over its grid) with baselines.py or frism.py, scores
everything with eval.py, prints the tables and saves the plots. `--only NAME` makes just the
named rows on the cached worlds. frism.py stays the one file of the method: this file only makes
inputs for it and calls it.

The tests use `build_tiny_trio` (random weights, seconds) and run this whole script with `--smoke`.
"""
import argparse
import functools
import json
import os
import random
import math
import re
import shutil
import time
import sys
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
    """A byte-level BPE tokenizer trained here, with Qwen's special tokens, as Qwen2Tokenizer.
    With vocab_size 263 it learns no merges: every byte, so every digit, is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import Qwen2Tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
# Steps, batch sizes and learning rates of each stage; --smoke shrinks them all. The VLM's last
# stage is gentle (lr 1e-5): when it was chosen, Task Arithmetic at lambda 1 transferred more VL
# reasoning on seed 0 the smaller this stage's learning rate (1e-4, 3e-5, 1e-5). A large VLM task
# vector of its own is what blocks composition in this world. Shorter BASE and LRM stages (450
# and 200 steps) were tried for time and rejected: on seed 0 the LRM lost part of its skill and
# Task Arithmetic's transfer at lambda 1 about halved.
STAGES = {"base": dict(steps=600, batch=32, lr=2e-3),
          "vision": dict(steps=600, batch=32, lr=2e-3),
          "vlm": dict(steps=100, batch=32, lr=1e-5),
          "lrm": dict(steps=300, batch=24, lr=2e-4)}
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


def fit(model, params, make_batch, stage, desc, extra_loss=None):
    """AdamW with a short warm-up and a cosine decay; returns the last loss."""
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
    model.eval()
    TIMES[f"world: {desc}"] = time.perf_counter() - started
    return loss.item()


def build_world(root, smoke=False, seed=0):
    """Train BASE, then the LRM and the VLM from it; save all three under root."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.set_flush_denormal(True)  # without it, small-model CPU training slowed ~6x here
    torch.manual_seed(seed)
    rng = random.Random(seed)
    stages = {name: dict(stage, **SMOKE) if smoke else stage for name, stage in STAGES.items()}
    tok = make_tokenizer(["0123456789"], vocab_size=256 + len(SPECIAL_TOKENS))
    processor = make_processor(tok)
    ids = special_ids(tok)
    text = dict(WORLD_TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])

    base = Qwen2ForCausalLM(Qwen2Config(**text))
    fit(base, base.parameters(), lambda: (text_batch(tok, [
        base_example(rng) for _ in range(stages["base"]["batch"])]), None),
        stages["base"], "BASE: chat format and copying")

    lrm = Qwen2ForCausalLM(base.config)
    lrm.load_state_dict(base.state_dict())
    lrm.requires_grad_(False)
    for p in merged_weights(lrm):
        p.requires_grad_(True)
    fit(lrm, merged_weights(lrm), lambda: (text_batch(tok, [
        lrm_example(rng) for _ in range(stages["lrm"]["batch"])] + [
        base_example(rng) for _ in range(8)]), None),  # replay keeps BASE's skills
        stages["lrm"], "LRM: worked arithmetic")

    vlm = vlm_from_base(base, text, WORLD_VISION, [4, 6, 6], ids)
    digit_ids = torch.tensor(tok.convert_tokens_to_ids(list("0123456789")))

    def toward_digit_embeddings(batch, digits):
        """Pull each visual token towards the text embedding of its digit (relative MSE)."""
        feats = torch.cat(vlm.model.get_image_features(batch["pixel_values"],
                                                       batch["image_grid_thw"]).pooler_output)
        target = vlm.model.language_model.embed_tokens.weight[digit_ids[digits]].detach()
        target = target.repeat_interleave(feats.shape[0] // len(digits), dim=0)
        return 5.0 * ((feats - target) ** 2).sum(-1).mean() / (target ** 2).sum(-1).mean()

    vlm.requires_grad_(False)
    vlm.model.visual.requires_grad_(True)
    fit(vlm, vlm.model.visual.parameters(), lambda: image_batch(
        processor, rng, stages["vision"]["batch"]), stages["vision"],
        "VLM: vision tower, language model frozen", toward_digit_embeddings)
    vlm.requires_grad_(True)  # a short, gentle all-trainable stage: the VLM's own task vector
    fit(vlm, vlm.parameters(), lambda: image_batch(processor, rng, stages["vlm"]["batch"]),
        stages["vlm"], "VLM: all weights")

    save_trio(root, tok, processor, base=base, lrm=lrm, vlm=vlm)


def write_benchmarks(root, n, seed=1):
    """eval.py's local form: toy perception, toy VL reasoning, the LRM's skill in its own wording
    and in the form a VLM's language model sees (text only, for the world check); and frism.py's
    label-free calibration set (questions and images, no answers)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)

    def image(name, d):
        draw_digit(d, rng).save(os.path.join(root, "images", name))
        return f"images/{name}"

    files = {"perception": [], "vl_reasoning": [], "text_reasoning": [], "marker_reasoning": [],
             "calib": []}
    for i in range(n):
        d = rng.randint(0, 9)
        files["perception"].append({"image": image(f"p{i}.png", d), "kind": "perception",
                                    "question": perception_question(rng), "answer": d})
        d = rng.randint(0, 9)
        files["vl_reasoning"].append({"image": image(f"r{i}.png", d), "kind": "reasoning",
                                      "question": VL_REASONING_QUESTION, "answer": 7 * d + 5})
        d = rng.randint(0, 9)
        files["text_reasoning"].append({"kind": "reasoning", "answer": 7 * d + 5, "question":
                                        f"What number is this: {d}? {INSTRUCTION}"})
        d = rng.randint(0, 9)
        files["marker_reasoning"].append({"kind": "reasoning", "answer": 7 * d + 5,
                                          "question": f"{shown(d)}{VL_REASONING_QUESTION}"})
    for i in range(max(8, n // 3)):
        files["calib"].append({"image": image(f"c{i}.png", rng.randint(0, 9)),
                               "question": perception_question(rng)})
    for name, items in files.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return {name: os.path.join(root, f"{name}.jsonl") for name in files}


def ideal_composition(world, out):
    """The ceiling a merge could reach: the VLM's vision tower and merger with the LRM's whole
    language model (embeddings, norms and lm_head included), no merging at all."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
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
RANKS = (1, 4, 16, 64)  # truncated Task Arithmetic at lambda 1: the top k directions
BANDS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 128))  # injected alone, at each TA lambda
SHOWN = "FRISM lam=2.0 alpha=0.1"  # the run whose every gate is drawn
MAX_NEW_TOKENS = 80  # the chain is 59 tokens and its end of turn: answers are scored complete


def reasoning_chains(processor, n, seed):
    """The oracle's labels: VL-reasoning questions on fresh images with the worked chain as the
    answer (drawn from a seed no benchmark uses), as frism.py's teacher items."""
    import frism
    rng = random.Random(10_000 + seed)
    digits = [rng.randint(0, 9) for _ in range(n)]
    return [frism.Answer(draw_digit(d, rng), VL_REASONING_QUESTION,
                         processor.tokenizer(reason(d) + "<|im_end|>").input_ids) for d in digits]


def oracle(chains, seed):
    """The ceiling of subspace gating here (ours): the same gates, trained on FRISM's KL plus the
    cross-entropy of labelled VL-reasoning chains, labels FRISM does not have. A second data
    stream, so it is made by a factory: frism.main(argv, make_objective=oracle(...))."""
    import torch.nn.functional as F
    import frism

    def make_objective(model, processor, gated, answers, args):
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
    the oracle's chains. Each method returns (program, argv), --out still to come."""

    def __init__(self, world, calib, seed, smoke):
        self.world, self.calib, self.seed, self.smoke = world, calib, seed, smoke
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

    @functools.cached_property
    def chains(self):
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(f"{self.world}/vlm")
        return reasoning_chains(processor, 8 if self.smoke else ORACLE_CHAINS, self.seed)


class Line(NamedTuple):
    """One method at one setting over a grid of one knob: a row of the table per grid point, a
    line (or a point) on the plots."""
    label: str  # the legend, and a name for --only
    row: str  # each row's name, "{}" standing for its grid value
    grid: tuple  # the knob's values, in order ((None,): one row)
    make: Optional[Callable]  # (value, Seed) -> (program, argv); None: the VLM itself, no merge
    full: bool = False  # only with --full
    plots: tuple = ("tradeoff",)  # "tradeoff", "bands", "ranks", "lam", "gates" (the bands
    # and lam plots draw Task Arithmetic beside their own lines)
    style: str = "o-"  # matplotlib format on the trade-off plot
    colour: str = "tab:blue"
    knob: str = ""  # each point annotated "knob=value" on the trade-off plot

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
           full=bool(start), plots=("tradeoff", "gates"), style="P:" if start else "*-",
           colour=colour, knob="α")
      for start, g0 in STARTS.items()
      for lam, colour in zip(FRISM_LAMS, ("darkred", "darkorange") if start else
                             ("tab:red", "tab:orange"))],
    *[Line(f"entropy objective{', open start' if start else ''}, lam {lam}",
           f"entropy {start}lam={lam} alpha={{}}", ALPHAS,
           lambda alpha, s, lam=lam, g0=g0: s.train("--objective", "entropy", "--lam", lam,
                                                    "--alpha", alpha, "--gate-init", g0),
           full=True, plots=("tradeoff", "gates"), style="X:" if start else "X-",
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
    Line("oracle: the same gates trained WITH labels", "oracle lam={}", FRISM_LAMS,
         lambda lam, s: s.train("--lam", lam, "--gate-init", STARTS["open "],
                                make_objective=oracle(s.chains, s.seed)),
         full=True, plots=("tradeoff", "gates"), style="*", colour="black", knob="lam"),
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
            raise SystemExit(f"toy.py: --only {pattern!r} names no row of the miniature; its "
                             f"lines: {', '.join(line.label for line in MINIATURE)}.")
        chosen.update({name: rows[name] for name in names})
    return chosen


def merges(world, runs, rows, seed_inputs):
    """{row name: model directory}, each merge made anew by baselines.py or frism.py."""
    models = {}
    for name, (line, value) in rows.items():
        if line.make is None:
            models[name] = f"{world}/vlm"
            continue
        main, argv = line.make(value, seed_inputs)
        out = os.path.join(runs, name.replace(" ", "_").replace("=", "-"))
        started = time.perf_counter()
        if main(argv + ["--out", out, "--overwrite"]):
            raise SystemExit(f"{name}: the merge failed")
        TIMES[f"merge {name}"] = time.perf_counter() - started
        models[name] = out
    return models


def scan(world, data, runs, smoke):
    """frism.py's label-free lambda scan over the TA grid, on the FRISM runs' calibration set."""
    import frism
    out = os.path.join(runs, "scan")
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
    """{row name: {benchmark: score}} and the share of answers cut by the token limit, by eval.py."""
    import eval as ev
    started = time.perf_counter()
    limit = 4 if smoke else MAX_NEW_TOKENS
    report = ev.run(ev.parse_args(["--models", *models.values(), "--benchmarks", *benchmarks,
                                   "--out", out, "--max-new-tokens", str(limit),
                                   "--batch-size", "50", "--device", "cpu"]))
    rows = {}
    for name, path in models.items():
        results = report["results"][path]
        rows[name] = {b: r["score"] for b, r in results.items() if r is not None}
        cut = [p["hit_token_limit"] for r in results.values() if r for p in r["predictions"]]
        rows[name]["cut_by_limit"] = 100.0 * sum(cut) / max(len(cut), 1)
    TIMES[f"scoring {os.path.basename(out)}"] = time.perf_counter() - started
    return rows


def world_check(world, data, runs, smoke=False):
    """Before any merge: can the LRM reason in both wordings, can the VLM read, and what does the
    ideal composition (VLM vision + the LRM's whole language model) reach?"""
    text = score({"LRM": f"{world}/lrm", "BASE": f"{world}/base"},
                 [data["text_reasoning"], data["marker_reasoning"]], f"{runs}/world_text.json", smoke)
    vision = score({"VLM": f"{world}/vlm", "ideal": ideal_composition(world, f"{world}/ideal")},
                   [data["perception"], data["vl_reasoning"]], f"{runs}/world_vision.json", smoke)
    return {**text, **vision}


def ensure_world(root, seed, smoke, rebuild):
    """Build the world of one seed, unless it is cached; returns its stage times."""
    world = os.path.join(root, "world")
    TIMES.clear()
    if rebuild or not os.path.isfile(os.path.join(world, "done")):
        shutil.rmtree(world, ignore_errors=True)
        build_world(world, smoke=smoke, seed=seed)
        open(os.path.join(world, "done"), "w").close()
    return dict(TIMES)


def one_seed(root, seed, items, smoke, world_times, full=False, only=None):
    """Check the world of one seed, merge it every way, score everything. With `only`, make and
    score just those rows and keep every other row of this seed's last summary."""
    world, runs = os.path.join(root, "world"), os.path.join(root, "runs")
    TIMES.clear()
    TIMES.update(world_times)
    last = None
    if only is not None and os.path.isfile(os.path.join(runs, "summary.json")):
        with open(os.path.join(runs, "summary.json")) as f:
            last = json.load(f)
    if only is None:
        shutil.rmtree(runs, ignore_errors=True)  # merges are always made anew by today's code
    data = write_benchmarks(os.path.join(root, "benchmarks"), 4 if smoke else items, seed + 1)
    check = last["world_check"] if last else world_check(world, data, runs, smoke)
    print_table("World check", check, ("text_reasoning", "marker_reasoning", "perception",
                                       "vl_reasoning"))
    started = time.perf_counter()
    kl = {k: v for k, v in ((n, r.get("scan_kl")) for n, r in last["rows"].items())
          if v is not None} if last else scan(world, data, runs, smoke)
    TIMES["lambda scan"] = time.perf_counter() - started
    rows = selected(only, full)
    models = merges(world, runs, rows, Seed(world, data["calib"], seed, smoke))
    scores = score(models, [data["perception"], data["vl_reasoning"]],
                   f"{runs}/results{'-only' if only else ''}.json", smoke)
    if last:  # the last run's rows, in the table's order, with the new ones in their place
        order = [name for line in MINIATURE for name in line.rows()]
        kept = {**last["rows"], **scores}
        scores = {name: kept[name] for name in order if name in kept}
        models = {name: path for name, path in {**last["models"], **models}.items()
                  if name in scores}
    for name, value in kl.items():
        if name in scores:
            scores[name]["scan_kl"] = value
    measured = [name for name in kl if name in scores]  # the TA rows the scan also measured
    summary = {"seed": seed, "world_check": check, "rows": scores, "models": models,
               "scan_kl": kl, "only": sorted(rows) if only else None,
               "scan_spearman": spearman([kl[n] for n in measured],
                                         [scores[n]["perception"] for n in measured])
               if len(measured) > 1 else None,
               "lambda_rule": lambda_rule(kl, scores), "seconds": dict(TIMES)}
    with open(os.path.join(runs, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


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


def print_times(summaries):
    """Where the time went, per seed: each stage of the world (when it was built), the lambda
    scan, each merge (grouped by kind), each scoring."""
    for s in summaries:
        groups = {}
        for name, seconds in s["seconds"].items():
            key = re.sub(r" [\d.=-]+|[=-][\d.]+", "", name) if name.startswith("merge ") else name
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
    from safetensors.torch import load_file
    return {key.removesuffix(".g"): torch.sigmoid(g) for key, g in load_file(
        os.path.join(run, "frism_gates.safetensors")).items() if key.endswith(".g")}


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
    left.set_title(f"sigmoid(g), {SHOWN}, seed {summaries[0]['seed']}")
    fig.colorbar(image, ax=left, fraction=0.03)
    lam = FRISM_LAMS[0]
    rows = [name for line in lines_in(table, "gates") for name in line.rows()
            if f"lam={lam}" in name and all(name in s["models"] for s in summaries)]
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        means = []
        for a, b in BANDS:  # mean gate of the band's directions, over layers and seeds
            values = torch.cat([g[a - 1:b] for s in summaries
                                for g in saved_gates(s["models"][row]).values()])
            means.append(values.mean().item() if len(values) else float("nan"))
        right.bar([k + i * width for k in range(len(BANDS))], means, width, label=row)
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(BANDS))],
                     [f"{a}-{b}" for a, b in BANDS])
    right.set_xlabel("singular directions (band)")
    right.set_ylabel("mean sigmoid(g)")
    right.set_ylim(0, 1)
    right.set_title(f"mean gate per band, lam {lam} ({len(summaries)} seed(s))")
    right.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return saved(plt, fig, os.path.join(out_dir, "gates.png"), 110)


MERGED_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None):
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
                   "and show them beside the rows of each seed's last run")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.items < 1:
        p.error("--seeds and --items must be positive")
    if args.only and (args.full or args.rebuild):
        p.error("--only runs the named rows on the cached worlds: --full and --rebuild have no "
                "effect with it")
    selected(args.only, args.full)  # an unknown --only name is refused before any work
    started = time.time()
    roots = [os.path.join(args.dir, f"seed-{seed}") for seed in range(args.seeds)]
    # Every world first: frism.py fixes glibc's mmap threshold for the rest of the process (see
    # frism.frugal_host_memory), which slows the many small allocations of training a world.
    world_times = [ensure_world(root, seed, args.smoke, args.rebuild)
                   for seed, root in enumerate(roots)]
    summaries = [one_seed(root, seed, args.items, args.smoke, times, args.full, args.only)
                 for seed, (root, times) in enumerate(zip(roots, world_times))]
    check, table = spread(summaries, "world_check"), spread(summaries, "rows")
    print_table(f"World check ({args.seeds} seed(s); mean, min-max in brackets)", check,
                ("text_reasoning", "marker_reasoning", "perception", "vl_reasoning"))
    print_table(f"Merges ({args.seeds} seed(s); mean, min-max in brackets)", table,
                ("perception", "vl_reasoning", "cut_by_limit", "scan_kl"))
    if args.only:
        print(f"(--only: {len(selected(args.only, True))} row(s) made now; every other row is "
              f"from each seed's last run, {os.path.join(args.dir, 'seed-N', 'runs')})")
    rho = [s["scan_spearman"] for s in summaries]
    print(f"\nLambda scan: rank correlation of its KL with TA's perception over the TA grid, per "
          f"seed: {', '.join('-' if r is None else f'{r:.2f}' for r in rho)}")
    print_rule(summaries)
    print_times(summaries)
    summary = {"seeds": args.seeds, "items": args.items, "full": args.full, "only": args.only,
               "world_check": check, "rows": table, "scan_spearman": rho,
               "lambda_rule": [s["lambda_rule"] for s in summaries], "per_seed": summaries}
    with open(os.path.join(args.dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for path in plot(table, check, summaries, args.dir):
        print(f"plot: {path}")
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
