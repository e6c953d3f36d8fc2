"""frism.py on every dense VLM family whose language model has a text-only twin: tiny random
models of the real classes, each family with its own processor, tokens and on-disk layout
(`model.layers`, `model.language_model.layers`, `language_model.model.layers`,
`model.text_model.layers`), and the real configs of the families that must be refused."""
import json
import os
import random

import pytest
import torch
from safetensors.torch import save_file

import eval as ev
import frism
from miniature import world
from test_frism import tensors

CHAT = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
            initializer_range=0.1)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              patch_size=14)


def tokenizer(specials, named=None):
    """Byte-level, one token per byte, Qwen's chat tokens plus the family's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import Qwen2Tokenizer
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + specials
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + len(specials), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["x"], trainer)
    vocab = json.loads(bpe.to_str())["model"]["vocab"]
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=named or {})
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def qwen2_vl(tok):
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2Config,
                              Qwen2ForCausalLM, Qwen2VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)
    ids = {t: tok.convert_tokens_to_ids(t) for t in world.SPECIAL_TOKENS}
    vlm = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=dict(TEXT, vocab_size=len(tok), rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 4])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=CHAT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    return vlm, Qwen2ForCausalLM(Qwen2Config(**TEXT, vocab_size=len(tok))), processor


def qwen3_vl(tok):
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3VLProcessor, Qwen2VLImageProcessor,
                              Qwen3VLVideoProcessor)
    ids = {t: tok.convert_tokens_to_ids(t) for t in world.SPECIAL_TOKENS}
    text = dict(TEXT, vocab_size=len(tok), head_dim=16)
    vlm = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(text, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                    mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, num_position_embeddings=64,
                           deepstack_visual_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16),
                                 tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=CHAT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    return vlm, Qwen3ForCausalLM(Qwen3Config(**text)), processor


PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def llava_onevision(tok):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              Qwen2Config, Qwen2ForCausalLM, LlavaOnevisionProcessor,
                              LlavaOnevisionImageProcessor, LlavaOnevisionVideoProcessor)
    text = dict(TEXT, vocab_size=len(tok))
    vlm = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        text_config=dict(text, model_type="qwen2"),
        vision_config=dict(SIGLIP, model_type="siglip_vision_model", image_size=28),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS))
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 28, "width": 28},
                                                     image_grid_pinpoints=PINPOINTS),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=4,
        vision_feature_select_strategy="full", chat_template=CHAT.replace("IMAGE", "<image>"))
    return vlm, Qwen2ForCausalLM(Qwen2Config(**text)), processor


GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                 "image_token": "<image_soft_token>"}


def gemma3(tok):
    """Gemma 3 with a text-only base of the 1B kind (Gemma3ForCausalLM); tied embeddings."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              Gemma3ForCausalLM, Gemma3Processor, Gemma3ImageProcessor)
    text = dict(TEXT, vocab_size=len(tok), head_dim=16, query_pre_attn_scalar=16,
                sliding_window=64, tie_word_embeddings=True)
    vlm = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=dict(SIGLIP, image_size=28), mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id))
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 28,
                                                                           "width": 28}),
                                tokenizer=tok, image_seq_length=4,
                                chat_template=CHAT.replace("IMAGE", "<start_of_image>"))
    return vlm, Gemma3ForCausalLM(Gemma3TextConfig(**text)), processor


INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def internvl(tok):
    """InternVL3 in its Hugging Face form, a Qwen2 language model; images cut into tiles."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, Qwen2Config,
                              Qwen2ForCausalLM, InternVLProcessor, GotOcr2ImageProcessor,
                              InternVLVideoProcessor)
    text = dict(TEXT, vocab_size=len(tok))
    vlm = InternVLForConditionalGeneration(InternVLConfig(
        text_config=dict(text, model_type="qwen2"),
        vision_config=dict(SIGLIP, image_size=56, patch_size=14), image_seq_length=4,
        image_token_id=tok.context_image_token_id, tie_word_embeddings=False))
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": 56, "width": 56},
                                              crop_to_patches=True, max_patches=4),
        tokenizer=tok, video_processor=InternVLVideoProcessor(), image_seq_length=4,
        chat_template=CHAT.replace("IMAGE", "<IMG_CONTEXT>"))
    return vlm, Qwen2ForCausalLM(Qwen2Config(**text)), processor


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"
                   ] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def idefics3(tok):
    """Idefics3 (SmolVLM's architecture), a Llama language model; large images split."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, LlamaConfig,
                              LlamaForCausalLM, Idefics3Processor, Idefics3ImageProcessor)
    text = dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    vlm = Idefics3ForConditionalGeneration(Idefics3Config(
        text_config=dict(text, model_type="llama"),
        vision_config=dict(SIGLIP, image_size=56, patch_size=14), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False))
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": 112},
                                               max_image_size={"longest_edge": 56}),
        tokenizer=tok, image_seq_len=4, chat_template=CHAT.replace("IMAGE", "<image>"))
    return vlm, LlamaForCausalLM(LlamaConfig(**text)), processor


# family: (its special tokens, those a processor reads as tokenizer attributes, builder,
# where its checkpoints keep the decoder, whether an image's token count follows its size)
FAMILIES = {
    "qwen2_vl": (world.SPECIAL_TOKENS[3:], None, qwen2_vl, "model.layers.", True),
    "qwen3_vl": (world.SPECIAL_TOKENS[3:], None, qwen3_vl, "model.language_model.layers.", True),
    "llava_onevision": (["<image>", "<video>"], None, llava_onevision,
                        "language_model.model.layers.", True),
    "gemma3": (list(GEMMA3_TOKENS.values()), GEMMA3_TOKENS, gemma3,
               "language_model.model.layers.", False),
    "internvl": (list(INTERNVL_TOKENS.values()), INTERNVL_TOKENS, internvl,
                 "language_model.model.layers.", True),
    "idefics3": (IDEFICS3_TOKENS, None, idefics3, "model.text_model.layers.", True),
}
SIZES = [(56, 56), (112, 56), (56, 140), (84, 84)]  # mixed sizes: tiles and crops differ


def build(family, root, multimodal_base=False, seed=0):
    """base/, lrm/ (base plus a random task vector), vlm/ with its processor, and a calibration
    .jsonl of images of mixed sizes. With multimodal_base, base and LRM are of the VLM's own
    class (Gemma 3 4B-27B: the -pt base is a Gemma3ForConditionalGeneration)."""
    from transformers import GenerationConfig
    specials, named, make, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    tok = tokenizer(list(specials), named)
    vlm, base, processor = make(tok)
    if multimodal_base:
        base = type(vlm)(vlm.config)
    lrm = type(base)(base.config)
    lrm.load_state_dict(base.state_dict())
    world.perturbed(lrm, 0.3, 4, seed + 1)
    world.perturbed(vlm, 0.1, 4, seed + 2)
    gen = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for name, model in (("base", base), ("lrm", lrm), ("vlm", vlm)):
        model.generation_config = gen
        model.save_pretrained(os.path.join(root, name))
        tok.save_pretrained(os.path.join(root, name))
    processor.save_pretrained(os.path.join(root, "vlm"))
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "data", "images"), exist_ok=True)
    with open(os.path.join(root, "data", "calib.jsonl"), "w") as f:
        for i, size in enumerate(SIZES):
            world.draw_digit(i, rng, hard=False).resize(size).save(os.path.join(root, "data", "images",
                                                                  f"{i}.png"))
            f.write(json.dumps({"image": f"images/{i}.png", "question": "What is shown?",
                                "kind": "perception", "answer": i}) + "\n")
    return {k: os.path.join(root, k) for k in ("base", "lrm", "vlm")} | {
        "data": os.path.join(root, "data", "calib.jsonl"), "family": family}


def trio_args(t, out, *extra):
    return ["--vlm", t["vlm"], "--lrm", t["lrm"], "--base", t["base"], "--out", str(out), *extra]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return build(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def trained(family, tmp_path_factory):
    """frism.py's whole training path, on calibration images of four different sizes."""
    out = tmp_path_factory.mktemp("out") / "frism"
    assert frism.main(trio_args(family, out, "--data", family["data"], "--steps", "2",
                                "--batch-size", "4", "--max-new-tokens", "4")) == 0
    return out


def assert_task_arithmetic(t, out, lam):
    """Every merged weight is W_vlm + lam * (W_lrm - W_base); every other tensor, the vision
    tower's included, is the VLM's bit for bit; the on-disk names are the input's."""
    vlm, lrm, base, merged = (tensors(p) for p in (t["vlm"], t["lrm"], t["base"], out))
    assert merged.keys() == vlm.keys()
    prefix = FAMILIES[t["family"]][3]
    moved = [k for k in vlm if frism.DECODER_PATH.search(k) and k.startswith(prefix)]
    assert len(moved) == 7 * 2
    to_text = {frism.DECODER_PATH.search(k).group(1): k for k in lrm
               if frism.DECODER_PATH.search(k) and "vision" not in k}
    for key in vlm:
        expected = vlm[key]
        if key in moved:
            name = to_text[frism.DECODER_PATH.search(key).group(1)]
            expected = vlm[key] + lam * (lrm[name] - base[name])
        assert torch.equal(merged[key], expected), key


def test_no_train_is_exact_task_arithmetic_in_every_family(family, tmp_path):
    assert frism.main(trio_args(family, tmp_path / "ta", "--no-train", "--lam", "0.5")) == 0
    assert_task_arithmetic(family, tmp_path / "ta", 0.5)


def test_a_multimodal_base_has_its_vision_tower_left_out(tmp_path):
    """Gemma 3 4B-27B: base and LRM are VLMs too; only their language model's tensors count."""
    t = build("gemma3", str(tmp_path / "trio"), multimodal_base=True)
    assert any("vision" in k and "layers.0.self_attn.q_proj" in k for k in tensors(t["base"]))
    assert frism.main(trio_args(t, tmp_path / "ta", "--no-train", "--lam", "0.5")) == 0
    assert_task_arithmetic(t, tmp_path / "ta", 0.5)


def test_batches_of_mixed_size_images_are_the_processors_business(family):
    """One processor call per batch: each answer sits right after its own prompt, and each
    image has as many image tokens as the processor gives it (tiles and crops differ)."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(family["vlm"])
    args = frism.parse_args(trio_args(family, "unused", "--data", family["data"]))
    samples = frism.load_calibration(args)
    answers = [[40 + i] * (i + 1) for i in range(len(samples))]
    batch, mask = frism.make_batch(processor, [frism.Answer(im, q, a) for (im, q), a in zip(samples, answers)],
                                   "cpu")
    for b, answer in enumerate(answers):
        positions = mask[b].nonzero().flatten()
        assert batch["input_ids"][b, positions + 1].tolist() == answer
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    counts = (batch["input_ids"] == image_token).sum(1).tolist()
    assert min(counts) > 0
    assert (len(set(counts)) > 1) == FAMILIES[family["family"]][4]


def test_training_changes_only_the_language_models_merged_weights(family, trained):
    vlm, merged = tensors(family["vlm"]), tensors(trained)
    assert merged.keys() == vlm.keys()
    changed = {k for k in vlm if not torch.equal(vlm[k], merged[k])}
    assert changed and all(k.startswith(FAMILIES[family["family"]][3]) for k in changed)
    assert all(frism.DECODER_PATH.search(k) for k in changed)


def test_the_output_loads_and_eval_py_generates_with_it(family, trained, tmp_path):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(trained)
    assert type(model).__name__ == type(AutoModelForImageTextToText.from_pretrained(
        family["vlm"])).__name__
    report = ev.run(ev.parse_args(["--models", str(trained), "--benchmarks", family["data"],
                                   "--max-new-tokens", "3", "--batch-size", "4",
                                   "--out", str(tmp_path / "scores.json")]))
    predictions = report["results"][str(trained)]["calib"]["predictions"]
    assert len(predictions) == len(SIZES)


@pytest.mark.parametrize("method", ["ties", "dare", "ip"])
def test_the_baselines_merge_every_family_where_frism_does(family, method, tmp_path):
    """TIES reads the VLM's own task vector, IP-Merging its SVD: both through the same matching
    of decoder paths, so only the language model's merged weights may move."""
    import baselines
    extra = ["--threshold", "0"] if method == "ip" else []
    assert baselines.main([method, *trio_args(family, tmp_path / method), *extra]) == 0
    vlm, merged = tensors(family["vlm"]), tensors(tmp_path / method)
    assert merged.keys() == vlm.keys()
    changed = {k for k in vlm if not torch.equal(vlm[k], merged[k])}
    assert len(changed) == 7 * 2
    assert all(k.startswith(FAMILIES[family["family"]][3]) for k in changed)


def test_dry_run_counts_any_family_exactly_from_its_config(family):
    cfg = frism.load_config(family["vlm"], "--vlm")
    on_disk = sum(t.numel() for t in tensors(family["vlm"]).values())
    assert frism.counted_parameters(cfg) == on_disk


# ---- Refused, with the reason ------------------------------------------------------------------

def a_model_dir(path, config):
    """A real config of the family and one readable (tiny) safetensors file."""
    config.save_pretrained(path)
    save_file({"x": torch.zeros(1)}, os.path.join(path, "model.safetensors"))
    return str(path)


def test_llama_32_vision_is_refused_for_its_cross_attention_layers(tmp_path):
    from transformers import MllamaConfig
    t = build("idefics3", str(tmp_path / "trio"))
    cfg = MllamaConfig(text_config=dict(TEXT, vocab_size=300, num_hidden_layers=3,
                                        cross_attention_layers=[1]))
    t["vlm"] = a_model_dir(tmp_path / "mllama", cfg)
    with pytest.raises(frism.InputError, match="cross-attention"):
        frism.check_inputs(t["vlm"], t["lrm"], t["base"], str(tmp_path / "out"))


def test_a_mixture_of_experts_vlm_is_refused(tmp_path):
    from transformers import Qwen3VLMoeConfig
    t = build("qwen3_vl", str(tmp_path / "trio"))
    t["vlm"] = a_model_dir(tmp_path / "moe", Qwen3VLMoeConfig(text_config=dict(
        TEXT, vocab_size=300, head_dim=16, num_experts=4, num_experts_per_tok=2)))
    with pytest.raises(frism.InputError, match="mixture-of-experts"):
        frism.check_inputs(t["vlm"], t["lrm"], t["base"], str(tmp_path / "out"))


def test_a_text_model_with_another_activation_is_refused(tmp_path):
    """Gemma 3 (gelu_pytorch_tanh) with a Qwen2 text model of the very same shapes (silu)."""
    gemma, qwen = build("gemma3", str(tmp_path / "gemma")), build("internvl", str(tmp_path / "q"))
    t = dict(gemma, lrm=qwen["lrm"], base=qwen["base"])
    with pytest.raises(frism.InputError, match="activation"):
        frism.check_inputs(t["vlm"], t["lrm"], t["base"], str(tmp_path / "out"))
