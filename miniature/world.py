"""The miniature's world: its tokenizer, its images, its reasoning skill and the three models
trained from scratch on the CPU (BASE, the LRM, the VLM), and the tiny trio the tests use, built of
the same parts. It uses frism.py only to know which weights are merged.

The skill. A problem is a digit and one to three operations (its depth), each under its ordinal,
its operand in words, the last always Third: "Second add seven. Third subtract four." Its worked
chain states the digit, then one numbered step an operation ("The number is 6. Second: 6 + 7 =
13. Third: 13 - 4 = 9. The answer is 9."). BASE knows the single facts ("What is 13 minus
four?" -> "13 - 4 = 9."), as a pre-trained LLM knows arithmetic; the LRM learns to chain them,
on problems of every depth; the VLM learns to read the digit from an image. A VL-reasoning item
shows the digit and asks the rest, so answering it takes both. A quarter of all problems are held
out (`Problem.held_out`): the LRM never trains on them, and every benchmark asks only them.
"""
import functools
import itertools
import json
import math
import os
import random
import time
import zlib
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The conversation format of Qwen2.5-VL-Instruct, written out for the tiny processor, with one
# change (ours): no default system turn, which would be a third of every sequence of the world,
# and so a third of its training time. The miniature scores with eval.py --system "" (no system
# turn), as frism.py's teacher asks: every model of the world reads the format it learned.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt(user):
    """The chat template's text around one user turn, written out (the tokenizer test checks it
    against the template)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


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


def special_ids(tok):
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


# ---- images ----------------------------------------------------------------------------------

def draw_digit(digit, rng, size=56, hard=True):
    """One digit on a 56 x 56 canvas (16 patches, 4 visual tokens): SMALLEST-42 px, in one of 4
    colours, jittered by up to 4 px. hard=True (the world, ours): a share UNREADABLE of the images
    is drawn through noise no one reads through, and of the rest a share LIGHT through light noise;
    the others are clean. The VLM's perception then has headroom set by the images, not by how far
    its tower happened to train (digits merely hard to read made it differ by world); the tiny
    trio draws none."""
    img = Image.new("RGB", (size, size), "white")
    font = font_of(rng.randint(SMALLEST if hard else 34, 42))
    ImageDraw.Draw(img).text((size // 2 + rng.randint(-4, 4), size // 2 + rng.randint(-4, 4)),
                             str(digit), fill=rng.choice(COLOURS), font=font, anchor="mm")
    if not hard:
        return img
    if rng.random() < UNREADABLE:
        sigma = BLIND
    elif rng.random() < LIGHT:
        sigma = rng.uniform(0, LIGHT_NOISE)
    else:
        return img
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal((size, size, 1))
    pixels = np.asarray(img, dtype=np.float32) + sigma * noise
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=None)
def font_of(size):
    """PIL's own font at a size, loaded once: the same glyphs, without reading it again for every
    image (about a twentieth of the vision stage's time)."""
    return ImageFont.load_default(size=size)


COLOURS = ["red", "green", "blue", "black"]
SMALLEST = 34  # the smallest digit, in pixels (ours, as the four below: set on development seeds)
UNREADABLE = 0.12  # the share of images drawn through noise no one reads through
BLIND = 480.0  # that noise, in grey levels
LIGHT = 0.3  # of the other images, the share drawn through light noise
LIGHT_NOISE = 160.0 / 3  # its strongest, in grey levels


# ---- the skill: problems, their wording and their worked chains --------------------------------

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS = ("First", "Second", "Third")
SAID = {"+": "add", "-": "subtract"}
OPERANDS = range(1, 10)
TOP = 18  # every value of a chain stays within 0-18: the facts are those of a one-digit table
DEPTHS = (1, 2, 3)
APPLY = {"+": lambda n, k: n + k, "-": lambda n, k: n - k}


class Problem(NamedTuple):
    """A digit (the image's) and the operations on it, e.g. (6, (("x", 3), ("+", 7)))."""
    digit: int
    ops: tuple

    @property
    def depth(self):
        return len(self.ops)

    def values(self):
        values = [self.digit]
        for op, k in self.ops:
            values.append(APPLY[op](values[-1], k))
        return values

    @property
    def answer(self):
        return self.values()[-1]

    def ordinal(self, i):
        """Operation i's ordinal, counted so that the last operation is always Third (ours): a
        problem of depth d is the last d steps of a three-step one, and each ordinal stands in one
        place, "Second" always one step before the end. Counted from the first, "Second" ended the
        question at depth 2 and not at depth 3, and the LRM's weakest cell sat there."""
        return ORDINALS[i + len(ORDINALS) - self.depth]

    def instruction(self):
        """The operations in order, each under its ordinal: "Second add seven. Third subtract
        four." (ours: an ordinal is one word that the chain repeats, so that each step finds its
        operation by it, whatever the number words around it)."""
        return " ".join(f"{self.ordinal(i)} {SAID[op]} {NUMBER_WORDS[k]}."
                        for i, (op, k) in enumerate(self.ops))

    def chain(self):
        """The worked answer: the digit, one step an operation under its ordinal, the answer."""
        values = self.values()
        steps = " ".join(f"{self.ordinal(i)}: {a} {op} {k} = {b}." for i, (a, (op, k), b) in
                         enumerate(zip(values, self.ops, values[1:])))
        return f"{perceive(self.digit)} {steps} The answer is {self.answer}."

    @property
    def held_out(self):
        """Ours: never in the LRM's training text, and every benchmark item is one of them (see
        held_out_problems)."""
        return self in held_out_problems(self.digit, self.depth)

    def valid(self):
        """Every value within 0-TOP, and an answer that is not the digit itself (which reading
        alone would give)."""
        return all(0 <= v <= TOP for v in self.values()) and self.answer != self.digit


@functools.cache
def held_out_problems(digit, depth):
    """Ours: a quarter (rounded up) of the valid problems at each digit and depth, those first in
    the order of a checksum of the problem, so that every digit and depth has some and they are
    drawn apart from any arithmetic. The first rule held out the problems whose digit and
    operands sum to a multiple of four: every chain of additions it held out then ended on a
    multiple of four, an answer no such chain had in training, and the LRM's failures gathered
    there."""
    every = itertools.product([(op, k) for op in APPLY for k in OPERANDS], repeat=depth)
    valid = sorted((p for p in (Problem(digit, ops) for ops in every) if p.valid()),
                   key=lambda p: zlib.crc32(repr(p).encode()))
    return frozenset(valid[:math.ceil(len(valid) / 4)])


def draw_problem(rng, digit, depth, held_out):
    """A valid problem at this digit and depth from the held-out quarter or the rest."""
    while True:
        problem = Problem(digit, tuple((rng.choice("+-"), rng.choice(OPERANDS))
                                       for _ in range(depth)))
        if problem.valid() and problem.held_out == held_out:
            return problem


def perceive(d):
    return f"The number is {d}."


PERCEPTION_QUESTIONS = ("What number is shown?", "Which digit is in the image?",
                        "Read the number in the picture.", "What digit do you see?",
                        "Tell me the number in this image.", "What is the number in the image?")
ASIDES = ("", "", " Be brief.", " Look carefully.", " Please answer.", " Thanks!")
# A VL-reasoning question is a perception question (any of its wordings) and the problem's
# instruction: answering it needs both skills. (Ours. The operands are words, so that reading the
# question never gives a digit; once, with "by 7 and add 5", the VLM copied the question's 5
# instead of reading.)


def vl_reasoning_question(problem, rng):
    return f"{rng.choice(PERCEPTION_QUESTIONS)} {problem.instruction()}"


def perception_question(rng):
    """Varied wording, sometimes with an aside, so that reading does not hang on one sentence."""
    return rng.choice(PERCEPTION_QUESTIONS) + rng.choice(ASIDES)


def shown(d):
    """The digit as text where a VLM has its image: between the vision markers, four times."""
    return f"<|vision_start|>{str(d) * 4}<|vision_end|>"


def text_question(problem):
    """The problem in the LRM's own wording (the digit written in the question)."""
    return f"What number is this: {problem.digit}? {problem.instruction()}"


def marker_question(problem, rng=None):
    """The problem as a VLM's language model sees it: the digit between the vision markers."""
    asked = rng.choice(PERCEPTION_QUESTIONS) if rng else PERCEPTION_QUESTIONS[0]
    return f"{shown(problem.digit)}{asked} {problem.instruction()}"


# ---- the models' training text --------------------------------------------------------------

def fact(rng):
    """One arithmetic fact as BASE learns it (every value within 0-TOP), its operand in digits or
    in words."""
    op, k = rng.choice("+-"), rng.choice(OPERANDS)
    n = rng.randint(k, TOP) if op == "-" else rng.randint(0, TOP - k)
    said = {"+": "plus", "-": "minus"}[op]
    question = f"What is {n} {said} {NUMBER_WORDS[k]}?" if rng.random() < 0.5 else \
        f"What is {n} {op} {k}?"
    return prompt(question), f"{n} {op} {k} = {APPLY[op](n, k)}."


def base_example(rng):
    """BASE's text: answers that copy a number from their context, and arithmetic facts."""
    d, kind = rng.randint(0, 9), rng.random()
    if kind < 0.15:
        return prompt(rng.choice([f"What number is this: {d}?", f"Read this number: {d}."])), \
            perceive(d)
    if kind < 0.45:  # the digit where the VLM will later see an image: 4 tokens, as 4 patches,
        # under every wording the VLM will be asked in (BASE, not the VLM, learns the wordings)
        return prompt(f"{shown(d)}{perception_question(rng)}"), perceive(d)
    return fact(rng)


def lrm_example(rng):
    """A training problem, half in the LRM's own wording, half in the form a VLM's language model
    sees: a chain tied to one wording would not transfer. Its depth is drawn 1 : 2 : 3 (ours: every
    chain has a first step, and only the deepest a third, the step the LRM learns last)."""
    problem = draw_problem(rng, rng.randint(0, 9), rng.choices(DEPTHS, (1, 2, 3))[0],
                           held_out=False)
    question = text_question(problem) if rng.random() < 0.5 else marker_question(problem, rng)
    return prompt(question), problem.chain()


def world_corpus(n=600):
    """The world's own text, for its tokenizer: BASE's and the LRM's examples, every perception
    wording, every instruction word. Every word of it becomes one token and every digit stays one
    (Qwen2's pre-tokenizer). Its own rng: the tokenizer is the same in every seed's world."""
    rng = random.Random(0)
    examples = [base_example(rng) for _ in range(n)] + [lrm_example(rng) for _ in range(n)]
    return [p + a + "<|im_end|>" for p, a in examples] + [
        prompt(q + aside) for q in PERCEPTION_QUESTIONS for aside in ASIDES] + [
        " ".join(NUMBER_WORDS + ORDINALS) + " add subtract plus minus:"]


# ---- training -----------------------------------------------------------------------------------

WORLD_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=False)
WORLD_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[1])
# Steps, batch sizes and learning rates of each stage, BASE's examples replayed in each LRM step
# (replay), and the temperature at which the vision stage classifies each visual token among the
# digits' embeddings (temp); --smoke shrinks steps and batches.
STAGES = {"base": dict(steps=600, batch=32, lr=2e-3),
          "lrm": dict(steps=1800, batch=18, replay=4, lr=2e-3),
          "vision": dict(steps=2000, batch=32, lr=3e-3, temp=0.05),
          "vlm": dict(steps=100, batch=32, lr=1e-5)}
SMOKE = dict(steps=3, batch=4)


def stages(smoke):
    return {name: dict(stage, **SMOKE) if smoke else stage for name, stage in STAGES.items()}


def merged_weights(model):
    """The 2-D weights of the decoder's q, k, v, o, gate, up and down projections: where merging
    acts. The LRM is fine-tuned on these only, so its whole task vector is one merging moves."""
    import frism
    return [p for name, p in model.named_parameters() if frism.DECODER_PATH.search(name)]


def text_batch(tok, examples):
    """Right-padded ids; the loss falls on the answer and its end-of-turn token only. "shown"
    marks the digits written between the vision markers, where a VLM has its visual tokens."""
    rows = [(tok(p + a + "<|im_end|>").input_ids, len(tok(a + "<|im_end|>").input_ids))
            for p, a in examples]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    for i, (row, n) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(row) - n:len(row)] = ids[i, len(row) - n:len(row)]
    start = ids == tok.convert_tokens_to_ids("<|vision_start|>")
    inside = start.cumsum(1) > (ids == tok.convert_tokens_to_ids("<|vision_end|>")).cumsum(1)
    return {"input_ids": ids, "attention_mask": (labels != -100) | (ids != tok.pad_token_id),
            "labels": labels, "shown": inside & ~start}


def read_fuzzy(model, batch):
    """The model's loss with each shown digit's embedding blurred as a visual token is (ours): a
    vision tower puts its tokens near the digit's embedding, never on it (about 0.45 of its norm
    away, measured in two worlds), so BASE and the LRM learn to read a digit from anywhere near
    its embedding, not from the exact point; without it, how well the LRM read the VLM's tokens,
    and so every merge, hung on the order of float sums. Each shown token moves in a random
    direction by FUZZ x its norm x a share drawn in [0, 1)."""
    batch = dict(batch)
    shown, ids = batch.pop("shown"), batch.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    size = embeds.detach().norm(dim=-1, keepdim=True) * FUZZ * torch.rand_like(embeds[..., :1])
    direction = F.normalize(torch.randn_like(embeds), dim=-1)
    return model(inputs_embeds=embeds + shown[..., None] * size * direction, **batch).loss


FUZZ = 0.8  # ours: beyond the distance measured, checked on development seeds


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


TIMES = {}  # seconds of each stage of the last build


def fit(model, params, make_batch, stage, desc, loss=lambda model, batch: model(**batch).loss,
        tick=lambda: None):
    """AdamW with a short warm-up and a cosine decay on loss(model, batch) (the model's own loss
    by default); tick() after every step; returns the last loss."""
    started = time.perf_counter()
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=stage["lr"], weight_decay=0.0)
    warmup = max(1, stage["steps"] // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) *
                                                 0.5 * (1 + math.cos(math.pi * s / stage["steps"])))
    model.train()
    bar = tqdm(range(stage["steps"]), desc=desc)
    for _ in bar:
        value = loss(model, make_batch())
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{value.item():.3f}")
        tick()
    model.eval()
    TIMES[f"world: {desc}"] = time.perf_counter() - started
    return value.item()


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
    fit(base, base.parameters(), lambda: text_batch(tok, [
        base_example(rng) for _ in range(recipe["base"]["batch"])]),
        recipe["base"], "BASE: chat format, copying, arithmetic", read_fuzzy,
        tick=lambda: tick("base"))

    lrm = Qwen2ForCausalLM(base.config)
    lrm.load_state_dict(base.state_dict())
    lrm.requires_grad_(False)
    for p in merged_weights(lrm):
        p.requires_grad_(True)
    fit(lrm, merged_weights(lrm), lambda: text_batch(tok, [
        lrm_example(rng) for _ in range(recipe["lrm"]["batch"])] + [
        base_example(rng) for _ in range(recipe["lrm"]["replay"])]),  # replay keeps BASE's skills
        recipe["lrm"], "LRM: worked chains", read_fuzzy, tick=lambda: tick("lrm"))

    vlm = vlm_from_base(base, text, WORLD_VISION, [4, 6, 6], ids)
    digits = vlm.model.language_model.embed_tokens.weight[
        tok.convert_tokens_to_ids(list("0123456789"))].detach()

    def toward_digit_embeddings(tower, batch):
        """The vision tower alone (the language model is not run): each visual token is pulled
        towards the text embedding of its image's digit (relative MSE) and classified among the
        ten digits' embeddings (cross-entropy of its dot products at temperature `temp`)."""
        images, labels = batch
        feats = torch.cat(tower.model.get_image_features(
            images["pixel_values"], images["image_grid_thw"]).pooler_output)
        labels = torch.tensor(labels).repeat_interleave(feats.shape[0] // len(labels))
        target = digits[labels]
        pull = ((feats - target) ** 2).sum(-1).mean() / (target ** 2).sum(-1).mean()
        return pull + F.cross_entropy(feats @ digits.T / recipe["vision"]["temp"], labels)

    def drawn(size):
        labels = [rng.randint(0, 9) for _ in range(size)]
        return processor.image_processor(images=[draw_digit(d, rng) for d in labels],
                                         return_tensors="pt"), labels

    vlm.requires_grad_(False)
    vlm.model.visual.requires_grad_(True)
    fit(vlm, vlm.model.visual.parameters(), lambda: drawn(recipe["vision"]["batch"]),
        recipe["vision"], "VLM: vision tower, language model frozen", toward_digit_embeddings,
        tick=lambda: tick("vision"))
    vlm.requires_grad_(True)  # a short, gentle all-trainable stage: the VLM's own task vector
    fit(vlm, vlm.parameters(), lambda: image_batch(processor, rng, recipe["vlm"]["batch"])[0],
        recipe["vlm"], "VLM: all weights", tick=lambda: tick("vlm"))

    save_trio(root, tok, processor, base=base, lrm=lrm, vlm=vlm)
    ideal_composition(root)


def ideal_composition(world):
    """world/ideal, the ceiling a merge could reach: the VLM's vision tower and merger with the
    LRM's whole language model (embeddings, norms and lm_head included), no merging at all."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
    out = f"{world}/ideal"
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{world}/vlm")
    lrm = Qwen2ForCausalLM.from_pretrained(f"{world}/lrm")
    vlm.model.language_model.load_state_dict(lrm.model.state_dict())
    vlm.lm_head.load_state_dict(lrm.lm_head.state_dict())
    vlm.save_pretrained(out)
    AutoProcessor.from_pretrained(f"{world}/vlm").save_pretrained(out)
    return out


# ---- the tiny trio the tests use: random weights of the real classes, built in seconds -------

TINY_TEXT = dict(vocab_size=None, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, tie_word_embeddings=False,
                 initializer_range=0.1)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                   fullatt_block_indexes=[1])


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
            draw_digit(digit, rng, hard=False).save(os.path.join(data, "images", f"{i}.png"))
            f.write(json.dumps({"image": f"images/{i}.png", "question": "What number is shown?",
                                "answer": str(digit)}) + "\n")
    return {k: os.path.join(root, k) for k in ("base", "lrm", "vlm")} | {
        "data": os.path.join(data, "calib.jsonl")}
