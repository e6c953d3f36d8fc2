"""A miniature of FRISM's setting that runs offline on a laptop.

`python toy.py` builds a tiny base / LRM / VLM trio of the real Hugging Face classes
(`Qwen2ForCausalLM`, `Qwen2_5_VLForConditionalGeneration`), a tokenizer trained here with
`tokenizers`, a real `Qwen2_5_VLProcessor` and a label-free calibration set of drawn images,
then runs `frism.py` on it: once as Task Arithmetic (`--no-train`) and once as FRISM proper.
The tests build the same trio (see conftest.py). frism.py stays the one file of the method;
this file only makes inputs for it.
"""
import argparse
import json
import os
import random
import subprocess
import sys

import torch
from PIL import Image, ImageDraw

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


def make_tokenizer(corpus):
    """A byte-level BPE tokenizer trained here, with Qwen's special tokens, as Qwen2Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import Qwen2Tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
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
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).text((20 + rng.randint(-4, 4), 20 + rng.randint(-4, 4)), str(digit),
                             fill=rng.choice(COLOURS))
    return img


def perturbed(model, scale, rank, seed):
    """Add a random low-rank-plus-noise update to every 2-D weight of a decoder (a task vector)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                d_out, d_in = p.shape
                low = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
                update = low / rank ** 0.5 + 0.3 * torch.randn(d_out, d_in, generator=g)
                p.add_(scale * p.norm() / update.norm() * update)
    return model


def build_tiny_trio(root, seed=0, num_images=8):
    """Write base/, lrm/, vlm/ (save_pretrained layout) and data/calib.jsonl under root."""
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, GenerationConfig)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    corpus = [f"What number is shown? The number is {d}." for d in range(10)] * 4
    tok = make_tokenizer(corpus)
    processor = make_processor(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(TINY_TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])

    base = Qwen2ForCausalLM(Qwen2Config(**text))
    lrm = Qwen2ForCausalLM(base.config)
    lrm.load_state_dict(base.state_dict())
    perturbed(lrm, 0.3, 4, seed + 1)

    vlm_cfg = Qwen2_5_VLConfig(
        text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(TINY_VISION, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    vlm = Qwen2_5_VLForConditionalGeneration(vlm_cfg)
    vlm.model.language_model.load_state_dict(base.model.state_dict())
    vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    perturbed(vlm.model.language_model, 0.1, 4, seed + 2)
    gen = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                           bos_token_id=ids["<|endoftext|>"])
    for name, model in [("base", base), ("lrm", lrm), ("vlm", vlm)]:
        model.generation_config = gen
        model.save_pretrained(os.path.join(root, name))
        tok.save_pretrained(os.path.join(root, name))
    processor.save_pretrained(os.path.join(root, "vlm"))

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


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the tiny trio and run frism.py on it, offline.")
    p.add_argument("--dir", default="toy_world", help="where the trio and the merged models go")
    p.add_argument("--rebuild", action="store_true", help="rebuild the trio even if cached")
    p.add_argument("--steps", type=int, default=50, help="FRISM training steps")
    args = p.parse_args(argv)
    import frism
    trio = os.path.join(args.dir, "trio")
    if args.rebuild or not os.path.isfile(os.path.join(trio, "data", "calib.jsonl")):
        import shutil
        shutil.rmtree(trio, ignore_errors=True)
        build_tiny_trio(trio)
    paths = ["--vlm", f"{trio}/vlm", "--lrm", f"{trio}/lrm", "--base", f"{trio}/base"]
    runs = {"task_arithmetic": ["--no-train"],
            "frism": ["--data", f"{trio}/data/calib.jsonl", "--steps", str(args.steps),
                      "--max-new-tokens", "8"]}
    for name, extra in runs.items():
        out = os.path.join(args.dir, name)
        if frism.main(paths + ["--out", out, "--overwrite"] + extra) != 0:
            return 1
        with open(os.path.join(out, "frism_report.json")) as f:
            report = json.load(f)
        curve = report["loss_curve"]
        summary = (f"KL {curve[-1]['kl']:.4f}, injected energy {curve[-1]['injected']:.3f}, "
                   f"mean gate {curve[-1]['mean_gate']:.3f}" if curve else "every gate open")
        print(f"{name:16s} -> {out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
