"""The paper in miniature: a base / LRM / VLM world small enough to build on a laptop, offline.

`python toy.py` trains, from scratch and on the CPU, three models of the real Hugging Face
classes (`Qwen2ForCausalLM`, `Qwen2_5_VLForConditionalGeneration`, a byte-level tokenizer
trained with `tokenizers`, a real `Qwen2_5_VLProcessor`):

  BASE  a tiny LLM that knows the chat format and can copy a number from its context;
  LRM   BASE fine-tuned on text-only worked arithmetic ("6 x 7 = 42. 42 + 5 = 47.");
  VLM   BASE's weights as its language model, a vision tower trained to read a drawn digit.

It then writes the toy benchmarks (perception: read the digit; VL reasoning: needs both, "multiply
the number shown by 7 and add 5"), merges with Task Arithmetic at several lambdas and with FRISM
(frism.py), scores everything with eval.py, prints the table and saves two plots. frism.py stays
the one file of the method: this file only makes inputs for it and calls it.

The tests use `build_tiny_trio` (random weights, seconds) and run this whole script with `--smoke`.
"""
import argparse
import json
import os
import random
import math
import shutil
import time
import sys

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
# stage is gentle (lr 1e-5): measured on seed 0, Task Arithmetic at lambda 1 answered 13 % of VL
# reasoning after that stage at lr 1e-4, 26 % at 3e-5 and 50 % at 1e-5 (the ideal composition:
# 53 %). A large VLM task vector of its own is what blocks composition in this world.
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


def fit(model, params, make_batch, stage, desc, extra_loss=None):
    """AdamW with a short warm-up and a cosine decay; returns the last loss."""
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
# The experiment: Task Arithmetic, the baselines and FRISM, each over its own knob, by eval.py
# ----------------------------------------------------------------------------------------------

# Every grid is fixed here, before any score was seen, and is the same for every seed.
LAMBDAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # Task Arithmetic
THRESHOLDS = (0.1, 0.2, 0.3, 0.4)  # IP-Merging's T, at lam 1
# FRISM over alpha (as TA over lambda) and over its own lam, taken from the same lambda grid:
# its gates start at sigmoid(0) = 0.5, i.e. at Task Arithmetic lam / 2, and can reach lam.
FRISM_LAMS = (1.0, 2.0)
ALPHAS = (0.1, 1.0)
FRISM_SETTINGS = ["--steps", "150", "--batch-size", "8", "--max-new-tokens", "16"]
SHOWN = (2.0, 0.1)  # the FRISM run whose gates are drawn (lam, alpha)
MAX_NEW_TOKENS = 80  # the chain is 59 tokens and its end of turn: answers are scored complete


def merges(world, runs, data, smoke):
    """{row name: output directory}, each made anew by baselines.py or frism.py."""
    import baselines
    import frism
    trio = ["--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base", f"{world}/base"]
    plan = [(f"TA {lam}", baselines.main, ["ta", "--lam", str(lam)]) for lam in LAMBDAS]
    plan += [("TIES", baselines.main, ["ties"]), ("DARE", baselines.main, ["dare"])]
    plan += [(f"IP T={t}", baselines.main, ["ip", "--threshold", str(t)]) for t in THRESHOLDS]
    plan += [(f"FRISM lam={lam} alpha={alpha}", frism.main, FRISM_SETTINGS + [
        "--lam", str(lam), "--alpha", str(alpha), "--data", data["calib"]] + (
        ["--steps", "2"] if smoke else [])) for lam in FRISM_LAMS for alpha in ALPHAS]
    models = {"VLM": f"{world}/vlm"}
    for name, main, args in plan:
        out = os.path.join(runs, name.replace(" ", "_").replace("=", "-"))
        argv = args[:1] + trio + args[1:] if main is baselines.main else trio + args
        if main(argv + ["--out", out, "--overwrite"]):
            raise SystemExit(f"{name}: the merge failed")
        models[name] = out
    return models


def score(models, benchmarks, out, smoke=False):
    """{row name: {benchmark: score}} and the share of answers cut by the token limit, by eval.py."""
    import eval as ev
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
    return rows


def world_check(world, data, runs, smoke=False):
    """Before any merge: can the LRM reason in both wordings, can the VLM read, and what does the
    ideal composition (VLM vision + the LRM's whole language model) reach?"""
    text = score({"LRM": f"{world}/lrm", "BASE": f"{world}/base"},
                 [data["text_reasoning"], data["marker_reasoning"]], f"{runs}/world_text.json", smoke)
    vision = score({"VLM": f"{world}/vlm", "ideal": ideal_composition(world, f"{world}/ideal")},
                   [data["perception"], data["vl_reasoning"]], f"{runs}/world_vision.json", smoke)
    return {**text, **vision}


def one_seed(root, seed, items, smoke, rebuild):
    """Build (or reuse) the world of one seed, check it, merge it every way, score everything."""
    world, runs = os.path.join(root, "world"), os.path.join(root, "runs")
    if rebuild or not os.path.isfile(os.path.join(world, "done")):
        shutil.rmtree(world, ignore_errors=True)
        build_world(world, smoke=smoke, seed=seed)
        open(os.path.join(world, "done"), "w").close()
    shutil.rmtree(runs, ignore_errors=True)  # merges are always made anew by today's code
    data = write_benchmarks(os.path.join(root, "benchmarks"), 4 if smoke else items, seed + 1)
    check = world_check(world, data, runs, smoke)
    print_table("World check", check, ("text_reasoning", "marker_reasoning", "perception",
                                       "vl_reasoning"))
    models = merges(world, runs, data, smoke)
    rows = score(models, [data["perception"], data["vl_reasoning"]], f"{runs}/results.json", smoke)
    summary = {"seed": seed, "world_check": check, "rows": rows, "models": models}
    with open(os.path.join(runs, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def spread(summaries, part):
    """{row: {column: (mean, min, max)}} over the seeds."""
    out = {}
    for name in summaries[0][part]:
        columns = summaries[0][part][name]
        out[name] = {c: (sum(s[part][name][c] for s in summaries) / len(summaries),
                         min(s[part][name][c] for s in summaries),
                         max(s[part][name][c] for s in summaries)) for c in columns}
    return out


def cell(value):
    if value is None:
        return "-"
    if isinstance(value, tuple):
        mean, low, high = value
        return f"{mean:.1f}" if low == high else f"{mean:.1f} ({low:.0f}-{high:.0f})"
    return f"{value:.1f}"


def print_table(title, rows, columns):
    names = {"text_reasoning": "text form", "marker_reasoning": "marker form",
             "perception": "perception", "vl_reasoning": "VL reasoning",
             "cut_by_limit": "cut (%)"}
    width = max(len(n) for n in rows) + 2
    print(f"\n{title}\n{'model':{width}s}" + "".join(f"{names[c]:>20s}" for c in columns))
    for name, row in rows.items():
        print(f"{name:{width}s}" + "".join(f"{cell(row.get(c)):>20s}" for c in columns))


def plot(table, check, summaries, out_dir):
    """The paper's Fig. 2 in miniature (every method, min-max over seeds as error bars), and the
    gates of one FRISM run: which subspaces closed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots.")
        return []
    paths = [os.path.join(out_dir, "tradeoff.png"), os.path.join(out_dir, "gates.png")]
    fig, ax = plt.subplots(figsize=(7, 5))

    def series(names, style, color, label, labels=None):
        points = [table[n] for n in names]
        x, y = [p["perception"][0] for p in points], [p["vl_reasoning"][0] for p in points]
        xerr = [[p["perception"][0] - p["perception"][1] for p in points],
                [p["perception"][2] - p["perception"][0] for p in points]]
        yerr = [[p["vl_reasoning"][0] - p["vl_reasoning"][1] for p in points],
                [p["vl_reasoning"][2] - p["vl_reasoning"][0] for p in points]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=style, color=color, label=label, capsize=2,
                    markersize=8)
        for xi, yi, text in zip(x, y, labels or []):
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color)

    series([f"TA {lam}" for lam in LAMBDAS], "o-", "tab:blue", "Task Arithmetic",
           [f"λ={lam}" for lam in LAMBDAS])
    series([f"IP T={t}" for t in THRESHOLDS], "^-", "tab:green", "IP-Merging",
           [f"T={t}" for t in THRESHOLDS])
    series(["TIES"], "D", "tab:purple", "TIES-Merging")
    series(["DARE"], "v", "tab:brown", "DARE")
    for lam, color in zip(FRISM_LAMS, ("tab:red", "tab:orange")):
        series([f"FRISM lam={lam} alpha={a}" for a in ALPHAS], "*-", color, f"FRISM, lam {lam}",
               [f"α={a}" for a in ALPHAS])
    series(["VLM"], "s", "gray", "VLM alone")
    ceiling = check["ideal"]
    ax.axhline(ceiling["vl_reasoning"][0], color="gray", ls=":", lw=1,
               label="ideal composition (ceiling)")
    ax.set_xlabel("toy perception accuracy (%)")
    ax.set_ylabel("toy VL reasoning accuracy (%)")
    ax.set_title(f"Reasoning against perception (toy world, {len(summaries)} seed(s))")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    import frism
    from safetensors.torch import load_file
    shown = summaries[0]["models"][f"FRISM lam={SHOWN[0]} alpha={SHOWN[1]}"]
    gates = {key.removesuffix(".g"): g for key, g in load_file(
        os.path.join(shown, "frism_gates.safetensors")).items() if key.endswith(".g")}
    world = os.path.dirname(summaries[0]["models"]["VLM"])
    # the singular values, recomputed from the task vectors (the gates file holds g only)
    decoder_path = {frism.DECODER_PATH.search(path + ".weight").group(1): path for path in gates}
    S = {decoder_path[name]: torch.linalg.svdvals(tau) for name, tau in frism.task_vectors(
        frism.safetensors_index(f"{world}/lrm", "--lrm"),
        frism.safetensors_index(f"{world}/base", "--base"), decoder_path)}
    names = sorted(gates, key=lambda p: (int(p.split(".layers.")[1].split(".")[0]),
                                         MERGED_ORDER.index(p.rsplit(".", 1)[1])))
    width = max(len(g) for g in gates.values())
    grid = torch.full((len(names), width), float("nan"))
    for row, path in enumerate(names):
        grid[row, :len(gates[path])] = torch.sigmoid(gates[path])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 6), gridspec_kw={"width_ratios": [3, 1]})
    image = left.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                        interpolation="nearest")
    left.set_yticks(range(len(names)), [f"L{p.split('.layers.')[1].split('.')[0]} "
                                        f"{p.rsplit('.', 1)[1]}" for p in names], fontsize=6)
    left.set_xlabel("singular direction (descending S; k and v have fewer)")
    left.set_title(f"gate sigmoid(g), FRISM lam {SHOWN[0]}, alpha {SHOWN[1]}")
    fig.colorbar(image, ax=left, fraction=0.03)
    energy = {}
    for path in names:
        kind = path.rsplit(".", 1)[1]
        s, total = torch.sigmoid(gates[path]) * S[path], S[path]
        injected, whole = energy.get(kind, (0.0, 0.0))
        energy[kind] = (injected + (s ** 2).sum().item(), whole + (total ** 2).sum().item())
    right.barh(list(energy), [a / b for a, b in energy.values()], color="tab:red")
    right.axvline(0.25, color="gray", ls=":", lw=1)  # where every gate starts: sigmoid(0)^2
    right.set_xlim(0, 1)
    right.invert_yaxis()
    right.set_xlabel("injected-energy fraction")
    right.set_title("per projection (start: 0.25)")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


MERGED_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the toy world (cached) and compare Task "
                                "Arithmetic, the baselines and FRISM in it, offline, on the CPU.")
    p.add_argument("--dir", default="toy_world", help="where the worlds, merges and plots go")
    p.add_argument("--seeds", type=int, default=1,
                   help="build this many worlds (seeds 0..N-1, each cached) and report the mean "
                        "and min-max of every figure")
    p.add_argument("--rebuild", action="store_true", help="retrain the worlds even if cached")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps of everything: checks the pipeline, shows nothing")
    p.add_argument("--items", type=int, default=100, help="items per toy benchmark")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.items < 1:
        p.error("--seeds and --items must be positive")
    started = time.time()
    summaries = [one_seed(os.path.join(args.dir, f"seed-{seed}"), seed, args.items, args.smoke,
                          args.rebuild) for seed in range(args.seeds)]
    check, table = spread(summaries, "world_check"), spread(summaries, "rows")
    print_table(f"World check ({args.seeds} seed(s); mean, min-max in brackets)", check,
                ("text_reasoning", "marker_reasoning", "perception", "vl_reasoning"))
    print_table(f"Merges ({args.seeds} seed(s); mean, min-max in brackets)", table,
                ("perception", "vl_reasoning", "cut_by_limit"))
    summary = {"seeds": args.seeds, "items": args.items, "world_check": check, "rows": table,
               "per_seed": summaries}
    with open(os.path.join(args.dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for path in plot(table, check, summaries, args.dir):
        print(f"plot: {path}")
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
