"""Score models side by side on VL reasoning and perception benchmarks, rule-based, no judge.

FRISM's claim is "reasoning up, perception kept": this prints one table, models as rows and
benchmarks as columns, with the reasoning and perception averages, and writes every raw
prediction to --out. Same prompts, system prompt, pixel limit and greedy decoding for every model.

    python eval.py --models Qwen/Qwen2.5-VL-7B-Instruct merged-7b --limit 500
    python eval.py --models merged-7b --benchmarks pope my_items.jsonl

A benchmark is a name below, NAME=PATH (the same benchmark from a local copy: a save_to_disk
directory or a directory of data files), or a local .jsonl file (see load_local).
"""
import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

import torch
from tqdm.auto import tqdm

# Hub ids, configs, splits and columns in one place: dataset ids move, so they are editable here.
# POPE and MME were re-hosted in 2026 from lmms-lab/ to lmms-lab-encoder/ (where lmms-eval 0.7.3
# reads them, with the columns used here). NAME=PATH on the command line points at a local copy.
BENCHMARKS = {
    "mathvista": dict(path="AI4Math/MathVista", config=None, split="testmini", kind="reasoning"),
    "mathverse": dict(path="AI4Math/MathVerse", config="testmini", split="testmini",
                      kind="reasoning"),
    "mathvision": dict(path="MathLLMs/MathVision", config=None, split="testmini",
                       kind="reasoning"),
    "pope": dict(path="lmms-lab-encoder/POPE", config=None, split="test", kind="perception"),
    "mme": dict(path="lmms-lab-encoder/MME", config=None, split="test", kind="perception"),
    "mmstar": dict(path="Lin-Chen/MMStar", config=None, split="val", kind="perception"),
}
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_HINT = "Answer with the option's letter."  # ours, as are the two hints below
YESNO_HINT = "Answer yes or no."
BOXED_HINT = "Please reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------------------------
# Inputs: eval.py stands alone (it imports nothing of this project), so it checks its own
# ----------------------------------------------------------------------------------------------

class InputError(Exception):
    """A problem with what the user asked for: reported as one sentence, exit code 2."""


def check_model_name(name):
    """A local directory, or something shaped like a hub id ("org/name"): else one clear error."""
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise InputError(f"--models {name!r} is a file, not a model directory.")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise InputError(f"--models {name!r} does not exist, and it is not shaped like a hub id "
                         f"(org/name).")


def check_checkpoint(name):
    """A local checkpoint's config parses and every safetensors file it names has a readable
    header (a download cut off half way fails here, with the file named, not in the middle)."""
    from safetensors import safe_open
    if not os.path.isdir(name):
        return  # a hub id: transformers downloads and checks it
    path = os.path.join(name, "config.json")
    try:
        with open(path) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path!r} is missing or does not parse ({e}); re-download it.") from e
    files = {f for f in os.listdir(name) if f.endswith(".safetensors")}
    for index in (f for f in os.listdir(name) if f.endswith(".safetensors.index.json")):
        try:
            with open(os.path.join(name, index)) as f:
                named = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{os.path.join(name, index)!r} does not parse ({e}); "
                             f"re-download it.") from e
        for missing in sorted(named - files):
            raise InputError(f"{os.path.join(name, missing)!r} is named by {index} but missing; "
                             f"re-download it.")
    for file in sorted(files):
        try:
            with safe_open(os.path.join(name, file), "pt") as f:
                f.keys()
        except Exception as e:
            raise InputError(f"{os.path.join(name, file)!r} is not a readable safetensors file "
                             f"({e}); it may be truncated: re-download it.") from e


def load_config(name):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        raise InputError(f"--models {name!r} has no readable config.json "
                         f"({type(e).__name__}).") from e


def end_of_turn_ids(model, tokenizer):
    """Every token id that ends a turn: the generation config's (one or a list) and the tokenizer's."""
    stop = model.generation_config.eos_token_id
    return set(stop if isinstance(stop, list) else [stop]) | {tokenizer.eos_token_id}


def fit_pixels(image, max_pixels):
    """Shrink an image to at most max_pixels, keeping its aspect ratio."""
    image = image.convert("RGB")
    w, h = image.size
    if w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(28, int(w * s)), max(28, int(h * s))))
    return image


def open_dataset(path, split, config=None):
    """A datasets.save_to_disk directory, or anything load_dataset reads (hub id, data files)."""
    import datasets
    if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
            os.path.join(path, "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(path, config, split=split)


# ----------------------------------------------------------------------------------------------
# Scoring rules: each a small function, written from the benchmarks' documented conventions
# ----------------------------------------------------------------------------------------------

def strip_thinking(output, prompt=""):
    """The text after the last </think>, and whether the output was cut inside a think block."""
    if "</think>" in output:
        return output.rsplit("</think>", 1)[1].strip(), False
    if "<think>" in output or prompt.rstrip().endswith("<think>"):
        return "", True
    return output.strip(), False


def last_boxed(text):
    """The content of the last \\boxed{...}, braces balanced, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def extract_letter(text, choices=None):
    """The option letter a model chose: "(B)", "B.", "The answer is B", "\\boxed{B}", or the
    option's own text; None when there is none."""
    n = len(choices) if choices else 5
    valid = LETTERS[:max(n, 1)]
    boxed = last_boxed(text)
    if boxed:
        text = boxed
    for pattern in (rf"answer\s*(?:is|:)?\s*:?\s*\(?([{valid}])\b\)?",
                    rf"\(([{valid}])\)", rf"(?:^|\s)([{valid}])[.):](?:\s|$)",
                    rf"^\s*([{valid}])\s*$", rf"\b([{valid}])\b\s*$"):
        found = re.findall(pattern, text, flags=re.IGNORECASE if "answer" in pattern else 0)
        if found:
            return found[-1].upper()
    if choices and not letters_only(choices):  # the option text: the last one mentioned
        lowered = text.lower()
        hits = [(lowered.rfind(str(c).lower()), len(str(c)), i) for i, c in enumerate(choices)
                if str(c).strip() and str(c).lower() in lowered]
        if hits:
            return LETTERS[max(hits)[2]]
    return None


def letters_only(choices):
    """Options that are just "A".."E" (the content is in the image): no text to match."""
    return all(str(c).strip() == LETTERS[i] for i, c in enumerate(choices))


def extract_yes_no(text):
    """Word-level: "Yes, there is a dog." is yes; the first yes or no word decides."""
    found = re.search(r"\b(yes|no)\b", text.lower())
    return found.group(1) if found else None


def to_number(text):
    """A float from "3", "-2.5", "1,000", "45%", "\\frac{3}{4}", "3/4", "\\sqrt{} free" LaTeX."""
    if text is None:
        return None
    text = text.replace("\\!", "").replace("$", "").replace(",", "").strip()
    frac = re.fullmatch(r"(-?)\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", text)
    if frac:
        value = float(frac.group(2)) / float(frac.group(3))
        return -value if frac.group(1) else value
    slash = re.fullmatch(r"(-?[\d.]+)\s*/\s*(-?[\d.]+)", text)
    if slash and float(slash.group(2)) != 0:
        return float(slash.group(1)) / float(slash.group(2))
    plain = re.fullmatch(r"(-?\d*\.?\d+)\s*(?:%|\\%|°|\^\\circ|\^\{\\circ\})?", text)
    return float(plain.group(1)) if plain else None


def extract_number(text):
    """The last \\boxed{} if it holds a number, else the last number in the text."""
    boxed = to_number(last_boxed(text))
    if boxed is not None:
        return boxed
    numbers = re.findall(r"-?\\d?frac\{-?[\d.]+\}\{-?[\d.]+\}|-?\d[\d,]*\.?\d*|-?\.\d+", text)
    for candidate in reversed(numbers):
        value = to_number(candidate.rstrip("."))
        if value is not None:
            return value
    return None


def numbers_match(predicted, gold, precision=None, integer=False):
    if predicted is None or gold is None:
        return False
    if integer:  # MathVista's scorer: int(float(prediction)), so 7.4 counts as 7
        return int(predicted) == int(gold)
    if precision is not None:
        return round(predicted, int(precision)) == round(gold, int(precision))
    return math.isclose(predicted, gold, rel_tol=1e-4, abs_tol=1e-6)


def normalise(text):
    return re.sub(r"[\s.,;:!?'\"`()\[\]{}]+", " ", str(text).lower()).strip()


def score_answer(text, item):
    """(extracted, correct) for one answer text (reasoning already stripped)."""
    kind, gold = item["type"], item["answer"]
    if kind == "mc":  # right if the letter is one the item accepts (several: duplicate options)
        got = extract_letter(text, item.get("choices"))
        if got in item.get("accept", [str(gold).strip().upper()]):
            return got, True
        if item.get("answer_text"):  # MathVerse: some answers are the option's text ("False")
            said, right = score_answer(text, {"type": "text", "answer": item["answer_text"]})
            return (said, True) if right else (got, False)
        return got, False
    if kind == "yesno":
        got = extract_yes_no(text)
        return got, got == str(gold).strip().lower()
    if kind == "number":
        got = extract_number(text)
        return got, numbers_match(got, to_number(str(gold)), item.get("precision"),
                                  item.get("integer", False))
    said = re.findall(r"answer is:?\s*(.+?)\s*\.?$", text, flags=re.IGNORECASE | re.MULTILINE)
    lines = text.strip().splitlines()
    got = last_boxed(text) or (said[-1] if said else lines[-1] if lines else "")
    return got, normalise(got) == normalise(gold)


# ----------------------------------------------------------------------------------------------
# Benchmarks -> items: {"id", "image" (PIL or None), "question", "answer", "type", "choices",
# "precision", "kind", "group" (a subtask), "pair" (MME: the image both questions share)}
# ----------------------------------------------------------------------------------------------

def with_choices(question, choices, hint=MC_HINT):
    lines = [f"({LETTERS[i]}) {c}" for i, c in enumerate(choices)]
    return f"{question}\nChoices:\n" + "\n".join(lines) + f"\n{hint}"


def mathvista_item(row):
    """`query` is MathVista's own prompt (hint + question + choices); `answer` is the option's
    text. MathVista's scorer maps the chosen letter to its option text and compares texts, so
    every letter whose option equals the answer is right (three testmini items list an option
    twice); options are compared without surrounding spaces (a few have trailing ones)."""
    item = dict(id=row["pid"], image=row["decoded_image"], question=row["query"], choices=None,
                answer=row["answer"], precision=None)
    if row["question_type"] == "multi_choice":
        choices = [str(c) for c in row["choices"]]
        item.update(type="mc", choices=choices, accept=[
            LETTERS[i] for i, c in enumerate(choices) if c.strip() == str(row["answer"]).strip()])
    elif row["answer_type"] in ("integer", "float"):
        precision = row["precision"]  # a float (1.0, 2.0) or None
        item.update(type="number", integer=row["answer_type"] == "integer",
                    precision=None if precision is None else int(precision))
    else:
        item.update(type="text")
    return item


def listed_options(text):
    """{letter: text} of options written "A: 2" / "A. 2" / "(A) 2" after "Choices" in a question."""
    text = re.split(r"choices\s*:?", text, maxsplit=1, flags=re.IGNORECASE)[-1]
    found = re.findall(r"^\s*\(?([A-H])\)?\s*[:.)：]\s*(.+?)\s*$", text, flags=re.MULTILINE)
    return dict(found)


def answer_form(gold, options):
    """MathVerse's multiple-choice answers come in four forms: (form, accepted letters, text)."""
    gold = gold.strip()
    if re.fullmatch(r"[A-H]", gold):
        return "letter", [gold], None
    if re.fullmatch(r"\(([A-H])\)", gold):
        return "parenthesised letter", [gold[1]], None
    if re.fullmatch(r"[A-H](?:[\s,;]+[A-H])+", gold):  # "C\nD": either letter is right
        return "several letters", re.findall(r"[A-H]", gold), None
    return "option text", [k for k, v in options.items() if normalise(v) == normalise(gold)], gold


def mathverse_item(row):
    """Ours: the multiple-choice subset of all five problem versions (free-form needs a judge).
    The prompt is `query_cot` (Vision Only items have an empty `question`: their options are in
    the image); an answer given as the option's text is matched as text."""
    if row["question_type"] != "multi-choice":
        return None
    options = listed_options(row["question"] or row["query_cot"])
    form, accept, text = answer_form(row["answer"], options)
    return dict(id=row["sample_index"], image=row["image"], question=row["query_cot"],
                answer=row["answer"], type="mc", choices=list(options.values()) or None,
                accept=accept, answer_text=text, answer_form=form, group=row["problem_version"])


def mathvision_item(row):
    """Options -> a letter; a letter answer without options is a letter too (its options are in
    the image), as are options that are just "A".."E"; otherwise the last \\boxed{} is compared
    as a number or as text."""
    options, question = [str(o) for o in row["options"] or []], row["question"]
    answer = str(row["answer"]).strip()
    if options and not letters_only(options):
        return dict(id=row["id"], image=row["decoded_image"], type="mc", choices=options,
                    question=with_choices(question, options, BOXED_HINT), answer=answer)
    if options or re.fullmatch(r"[A-E]", answer):
        letters = ", ".join(LETTERS[:len(options) or 5])
        return dict(id=row["id"], image=row["decoded_image"], type="mc", choices=None,
                    question=f"{question}\nChoices: {letters}\n{BOXED_HINT}", answer=answer)
    kind = "number" if to_number(answer) is not None else "text"
    return dict(id=row["id"], image=row["decoded_image"], type=kind, answer=answer,
                question=f"{question}\n{BOXED_HINT}")


def pope_item(row):
    return dict(id=row["question_id"], image=row["image"], type="yesno", answer=row["answer"],
                question=f"{row['question']}\n{YESNO_HINT}", group=row["category"])


def mme_item(row):
    """MME's questions already end in "Please answer yes or no." (no second hint); answers are
    "Yes"/"No". An image's two questions are paired by subtask and file name (bare file names
    repeat across the cognition subtasks)."""
    return dict(id=f"{row['question_id']}:{row['question']}", image=row["image"], type="yesno",
                answer=row["answer"], question=row["question"], group=row["category"],
                pair=f"{row['category']}/{row['question_id']}")


def mmstar_item(row):
    """MMStar's questions hold their options; the answer is a letter."""
    return dict(id=row["index"], image=row["image"], type="mc", answer=row["answer"],
                question=f"{row['question']}\n{MC_HINT}", group=row["category"])


ITEMS = {"mathvista": mathvista_item, "mathverse": mathverse_item,
         "mathvision": mathvision_item, "pope": pope_item, "mme": mme_item,
         "mmstar": mmstar_item}


def load_hub(name, path, limit):
    """A benchmark from the hub (or a local copy of it), as items; --limit after a seeded shuffle."""
    spec = BENCHMARKS[name]
    path = path or spec["path"]
    try:
        rows = open_dataset(path, spec["split"], spec["config"])
    except Exception as e:
        raise InputError(f"benchmark {name!r} could not be loaded from {path!r} "
                         f"({type(e).__name__}); download it and pass {name}=PATH (a "
                         f"save_to_disk directory or a directory of its data files), or edit "
                         f"its id in BENCHMARKS at the top of eval.py.") from e
    try:
        items = [item for item in map(ITEMS[name], rows) if item is not None]
    except KeyError as e:
        raise InputError(f"benchmark {name!r} at {path!r} has no column {e}; is it a copy of "
                         f"{spec['path']}?") from e
    if limit and limit < len(items):  # ours: a seeded sample, so every category is represented
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))
        items = [items[i] for i in order[:limit].tolist()]
    return [dict(item, kind=spec["kind"]) for item in items]


def infer_type(item):
    if item.get("choices"):
        return "mc"
    if str(item["answer"]).strip().lower() in ("yes", "no"):
        return "yesno"
    return "number" if to_number(str(item["answer"])) is not None else "text"


def load_local(path, limit):
    """A .jsonl benchmark: one item a line with `question`, `answer`, `kind` ("reasoning" or
    "perception"), and optional `image` (relative to the file), `choices` (then `answer` is the
    option letter or the option's text), `type` ("mc" | "yesno" | "number" | "text"),
    `precision` (decimals) and `reference` (a whole correct answer, e.g. a worked chain: each
    model's log-likelihood of it is reported beside the accuracy, see reference_logp). Any other
    field is kept with the item and its prediction (a depth, a category)."""
    from PIL import Image
    if not os.path.isfile(path):
        raise InputError(f"benchmark file {path!r} does not exist.")
    root, items = os.path.dirname(os.path.abspath(path)), []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8"))
                item["question"], item["answer"], kind = item["question"], item["answer"], item["kind"]
                if kind not in ("reasoning", "perception"):
                    raise ValueError(f"kind must be reasoning or perception, not {kind!r}")
                if item.get("image"):
                    item["image"] = Image.open(os.path.join(root, item["image"]))
            except (ValueError, KeyError, TypeError, OSError) as e:
                raise InputError(f"{path!r} line {n} is not a usable benchmark item ({e}).") from e
            item.setdefault("id", n)
            item["type"] = item.get("type") or infer_type(item)
            choices = item.get("choices")
            if item["type"] == "mc" and choices and item["answer"] in choices:
                item["accept"] = [LETTERS[i] for i, c in enumerate(choices) if c == item["answer"]]
                item["answer"] = item["accept"][0]
            if item["type"] == "mc" and choices:
                item["question"] = with_choices(item["question"], choices)
            items.append(item)
    if not items:
        raise InputError(f"benchmark file {path!r} holds no items.")
    return items[:limit] if limit else items


def load_benchmarks(names, limit):
    """{column name: items}. A local file whose items are of both kinds gives two columns."""
    out = {}
    for name in names:
        key, _, path = name.partition("=")
        if key in BENCHMARKS:
            out[key] = load_hub(key, path or None, limit)
        elif name.endswith(".jsonl"):
            items, stem = load_local(name, limit), os.path.splitext(os.path.basename(name))[0]
            kinds = sorted({item["kind"] for item in items})
            for kind in kinds:
                column = stem if len(kinds) == 1 else f"{stem}/{kind}"
                out[column] = [item for item in items if item["kind"] == kind]
        else:
            raise InputError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}, "
                             f"NAME=PATH, or a .jsonl file.")
    return out


# ----------------------------------------------------------------------------------------------
# Models and generation: batched, left-padded, greedy, the same for every model
# ----------------------------------------------------------------------------------------------

def load_model(name, args):
    """A VLM (its own class) with its processor, or a text-only LLM with its tokenizer."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)
    check_checkpoint(name)
    config = load_config(name)
    dtype, vision = getattr(torch, args.dtype), hasattr(config, "vision_config")
    if vision:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
        processor = AutoProcessor.from_pretrained(name)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        processor = tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(model=model.to(args.device).eval(), processor=processor, tokenizer=tokenizer,
                vision=vision)


def chat(m, question, has_image, system):
    content = [{"type": "image"}, {"type": "text", "text": question}] if has_image else question
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": content}]
    if m["tokenizer"].chat_template is None and getattr(m["processor"], "chat_template", None) is None:
        return f"{system}\n\n{question}\n" if system else f"{question}\n"  # plain text
    return m["processor"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def image_groups(items):
    """The indices of the items with an image, then of those without: one batch holds one kind."""
    return [[i for i, it in enumerate(items) if it.get("image") is not None],
            [i for i, it in enumerate(items) if it.get("image") is None]]


def prompt_inputs(m, items, chunk, args, padding_side):
    """The chat prompts of items[chunk] (all with an image or all without), tokenised: one
    processor call, one image list per sample, so tiles, crops and image-token counts are the
    processor's business, whatever the model family."""
    has_image = items[chunk[0]].get("image") is not None
    prompts = [chat(m, items[i]["question"], has_image, args.system) for i in chunk]
    if m["vision"]:
        images = [[fit_pixels(items[i]["image"], args.max_pixels)] for i in chunk
                  ] if has_image else None
        return prompts, m["processor"](text=prompts, images=images, padding=True,
                                       padding_side=padding_side, return_tensors="pt")
    return prompts, m["tokenizer"](prompts, padding=True, padding_side=padding_side,
                                   return_tensors="pt", add_special_tokens=False)


@torch.no_grad()
def generate(m, items, args, desc):
    """(prompt, output text, hit the token limit) for every item; images first, then text-only."""
    stop = end_of_turn_ids(m["model"], m["tokenizer"])
    results = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc)
    for group in image_groups(items):
        for start in range(0, len(group), args.batch_size):
            chunk = group[start:start + args.batch_size]
            prompts, inputs = prompt_inputs(m, items, chunk, args, "left")
            out = m["model"].generate(**inputs.to(args.device), do_sample=False,
                                      max_new_tokens=args.max_new_tokens)
            for i, prompt, ids in zip(chunk, prompts, out[:, inputs["input_ids"].shape[1]:].tolist()):
                ends = [n for n, t in enumerate(ids) if t in stop]
                text = m["tokenizer"].decode(ids[:ends[0]] if ends else ids, skip_special_tokens=True)
                results[i] = (prompt, text, not ends)
            bar.update(len(chunk))
    bar.close()
    return results


@torch.no_grad()
def reference_logp(m, items, args):
    """Per item with a `reference` answer: the mean log-probability per token of that answer after
    the item's prompt, read teacher-forced (ours). Exact match says only whether a model's own
    answer is right; this also shows a model that comes closer to the right answer without
    reaching it. None for items without a reference."""
    import torch.nn.functional as F
    results = [None] * len(items)
    for group in image_groups(items):
        group = [i for i in group if items[i].get("reference")]
        for start in range(0, len(group), args.batch_size):
            chunk = group[start:start + args.batch_size]
            _, inputs = prompt_inputs(m, items, chunk, args, "right")
            answers = [m["tokenizer"](items[i]["reference"], add_special_tokens=False).input_ids
                       for i in chunk]
            batch, where = with_answers(inputs, answers, m["tokenizer"].pad_token_id)
            logp = F.log_softmax(m["model"](**batch.to(args.device)).logits.float(), dim=-1)
            for i, positions, answer in zip(chunk, where, answers):
                results[i] = logp[positions[0], positions[1], torch.tensor(answer)].mean().item()
    return results


def with_answers(inputs, answers, pad):
    """Each answer's ids written after its right-padded prompt (every per-token tensor extended
    alike); and, per row, the positions whose logits predict the answer's tokens."""
    lengths = inputs["attention_mask"].sum(1).tolist()
    length = max(n + len(a) for n, a in zip(lengths, answers))
    batch = dict(inputs)
    for k, v in inputs.items():
        if not (torch.is_tensor(v) and v.shape == inputs["input_ids"].shape):
            continue  # pixel values, grid sizes: as the processor made them
        batch[k] = torch.full((len(answers), length), pad if k == "input_ids" else 0,
                              dtype=v.dtype)
        for b, (n, a) in enumerate(zip(lengths, answers)):
            tail = {"input_ids": a, "attention_mask": [1] * len(a)}.get(k, [0] * len(a))
            batch[k][b, :n] = v[b, :n]
            batch[k][b, n:n + len(a)] = torch.tensor(tail, dtype=v.dtype)
    where = [(b, torch.arange(n - 1, n - 1 + len(a))) for b, (n, a) in
             enumerate(zip(lengths, answers))]
    return type(inputs)(batch), where


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def mean(values):
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def pope_metrics(predictions):
    """Accuracy, and precision / recall / F1 with "yes" as the positive class."""
    said = [p["extracted"] == "yes" for p in predictions]
    gold = [str(p["answer"]).lower() == "yes" for p in predictions]
    tp = sum(s and g for s, g in zip(said, gold))
    precision = tp / max(sum(said), 1)
    recall = tp / max(sum(gold), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
            "yes_ratio": mean(said)}


def mme_metrics(items, predictions):
    """Per subtask: acc (questions) and acc+ (images with both questions right); score = acc +
    acc+ (max 200). Perception totals over 10 subtasks (2000), cognition over 4 (800)."""
    by_task, by_image = defaultdict(list), defaultdict(list)
    for item, p in zip(items, predictions):
        by_task[item["group"]].append(p["correct"])
        by_image[item["group"], item["pair"]].append(p["correct"])
    tasks = {}
    for task, correct in by_task.items():
        pairs = [all(c) for (t, _), c in by_image.items() if t == task and len(c) == 2]
        tasks[task] = {"acc": mean(correct), "acc_plus": mean(pairs)}
        tasks[task]["score"] = tasks[task]["acc"] + tasks[task]["acc_plus"]
    perception = [t for t in tasks if t in MME_PERCEPTION]
    cognition = [t for t in tasks if t not in MME_PERCEPTION]
    headline = perception or cognition  # ours: perception total on a 0-100 scale
    return {"subtasks": tasks,
            "perception_total": sum(tasks[t]["score"] for t in perception),
            "cognition_total": sum(tasks[t]["score"] for t in cognition),
            "headline": sum(tasks[t]["score"] for t in headline) / (2 * len(headline))}


# An item's fields that eval.py reads; any other is copied into its prediction as it is.
READ = ("id", "question", "answer", "image", "kind", "type", "choices", "accept", "precision",
        "integer", "group", "pair", "answer_form", "answer_text", "reference")


def score_benchmark(name, items, generations, references=None):
    predictions = []
    for n, (item, (prompt, output, hit_limit)) in enumerate(zip(items, generations)):
        answer, truncated = strip_thinking(output, prompt)
        extracted, correct = score_answer(answer, item) if not truncated else (None, False)
        predictions.append({"id": str(item["id"]), "question": item["question"],
                            "answer": item["answer"], "output": output, "extracted": extracted,
                            "correct": bool(correct), "truncated_in_think": truncated,
                            "hit_token_limit": hit_limit, "group": item.get("group"),
                            **({"reference_logp": references[n]} if references else {}),
                            **{k: v for k, v in item.items() if k not in READ and
                               isinstance(v, (str, int, float, bool))}})
    metrics = {"n": len(items), "accuracy": mean(p["correct"] for p in predictions),
               "truncated_in_think": mean(p["truncated_in_think"] for p in predictions)}
    scored = [p["reference_logp"] for p in predictions if p.get("reference_logp") is not None]
    if scored:  # mean log-likelihood per token of the reference answers, items averaged
        metrics["reference_logp"] = sum(scored) / len(scored)
    forms = [item["answer_form"] for item in items if item.get("answer_form")]
    if forms:  # MathVerse: how many answers came as a letter, "(C)", option text, two letters
        metrics["answer_forms"] = {form: forms.count(form) for form in sorted(set(forms))}
    score = metrics["accuracy"]
    if name == "pope":  # POPE's own scorer reports each category; the column is pooled accuracy
        metrics.update(pope_metrics(predictions))
        metrics["per_category"] = {group: dict(
            accuracy=mean(p["correct"] for p in predictions if p["group"] == group),
            **pope_metrics([p for p in predictions if p["group"] == group]))
            for group in sorted({p["group"] for p in predictions})}
    if name == "mme":
        metrics.update(mme_metrics(items, predictions))
        score = metrics["headline"]
    return {"score": score, "metrics": metrics, "predictions": predictions}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def averages(results, kinds):
    out = {}
    for kind in ("reasoning", "perception"):
        scores = [r["score"] for b, r in results.items() if kinds[b] == kind and r is not None]
        out[kind] = sum(scores) / len(scores) if scores else None
    return out


def table(all_results, kinds):
    columns = list(kinds) + ["reasoning avg", "perception avg"]
    width = max([len("model")] + [len(os.path.basename(os.path.normpath(m))) for m in all_results])
    lines = ["model".ljust(width) + "".join(f"  {c:>{max(len(c), 7)}}" for c in columns)]
    for model, results in all_results.items():
        avg = averages(results, kinds)
        cells = [results[b]["score"] if results[b] else None for b in kinds]
        cells += [avg["reasoning"], avg["perception"]]
        lines.append(os.path.basename(os.path.normpath(model)).ljust(width) + "".join(
            f"  {('-' if v is None else f'{v:.1f}'):>{max(len(c), 7)}}"
            for c, v in zip(columns, cells)))
    return "\n".join(lines)


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, except where there is none to show (None, or off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--models", nargs="+", required=True,
                   help="model directories or hub ids (VLMs, or text-only LLMs)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS),
                   help="names, NAME=PATH for a local copy, or .jsonl files")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N items per benchmark; if not given, every item")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="generation limit (reasoning models think at length: raise it if the "
                        "truncated rate is high)")
    p.add_argument("--max-pixels", type=int, default=1280 * 28 * 28,
                   help="images are shrunk to at most this many pixels")
    p.add_argument("--system", default="You are a helpful assistant.",
                   help="the system prompt, the same for every model; empty: no system turn (the "
                   "model's chat template decides)")
    p.add_argument("--out", default="results.json", help="raw predictions and scores (JSON), "
                   "rewritten after every model and benchmark")
    p.add_argument("--resume", action="store_true", help="keep the (model, benchmark) results "
                   "already in --out and run only the missing ones")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the models run")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="working dtype; if not given, bfloat16 on GPU, float32 on CPU")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    return args


# Settings that change a score: a resumed run must use the same ones.
SCORED_WITH = ("limit", "max_new_tokens", "max_pixels", "system", "dtype")


def check_args(args):
    for flag in ("limit", "batch_size", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be a positive integer, not "
                             f"{getattr(args, flag)}.")
    if args.max_pixels < 28 * 28:
        raise InputError("--max-pixels must be at least 784 (one 28 x 28 patch).")
    for name in args.models:
        check_model_name(name)
    if os.path.isdir(args.out):
        raise InputError(f"--out {args.out!r} is a directory; give a file name.")


def previous_report(args):
    """The report --resume continues, or a fresh one."""
    fresh = {"settings": vars(args), "kinds": {}, "averages": {}, "results": {}, "failed": {}}
    if args.resume and not os.path.exists(args.out):
        print(f"eval.py: --resume: {args.out!r} does not exist yet; scoring everything.",
              file=sys.stderr)
    if not args.resume or not os.path.exists(args.out):
        return fresh
    try:
        with open(args.out) as f:
            report = json.load(f)
        settings = report["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--resume: {args.out!r} is not a results file of eval.py ({e}).") from e
    differ = [k for k in SCORED_WITH if settings.get(k) != getattr(args, k)]
    if differ:
        raise InputError(f"--resume: {args.out!r} was scored with other settings "
                         f"({', '.join('--' + k.replace('_', '-') for k in differ)}); use the "
                         f"same ones or another --out.")
    return dict(fresh, kinds=report.get("kinds", {}), results=report.get("results", {}))


def write_report(report, path):
    """Atomically: a crash while writing leaves the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


def run(args):
    """Score every model on every benchmark; --out is rewritten after each (model, benchmark),
    so a crash loses at most the pair in progress and --resume picks up from there."""
    check_args(args)
    benchmarks = load_benchmarks(args.benchmarks, args.limit)
    report = previous_report(args)
    report["kinds"].update({name: items[0]["kind"] for name, items in benchmarks.items()})
    for name in args.models:
        results = report["results"].setdefault(name, {})
        todo = [bench for bench in benchmarks if bench not in results]
        if not todo:
            continue
        try:
            m = load_model(name, args)
        except Exception as e:  # one model that cannot be loaded does not stop the others
            reason = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
            report["failed"][name] = reason.splitlines()[0] if reason else type(e).__name__
            print(f"eval.py: {name}: could not be loaded, skipped: {report['failed'][name]}",
                  file=sys.stderr)
            del report["results"][name]
            continue
        for bench in todo:
            items = benchmarks[bench]
            usable = items if m["vision"] else [it for it in items if it.get("image") is None]
            desc = f"{os.path.basename(os.path.normpath(name))} / {bench}"
            references = reference_logp(m, usable, args) if any(
                item.get("reference") for item in usable) else None
            results[bench] = score_benchmark(bench, usable, generate(m, usable, args, desc),
                                             references) if usable else None  # text-only
            # models skip items with images
            report["averages"][name] = averages(
                {b: r for b, r in results.items() if b in report["kinds"]}, report["kinds"])
            write_report(report, args.out)
        del m
    shown = {name: {b: report["results"][name].get(b) for b in benchmarks}
             for name in args.models if name in report["results"]}
    write_report(report, args.out)
    print(table(shown, {b: report["kinds"][b] for b in benchmarks}))
    for model, results in shown.items():
        cut = {b: r["metrics"]["truncated_in_think"] for b, r in results.items()
               if r and r["metrics"]["truncated_in_think"] > 0}
        if cut:
            print(f"{model}: outputs cut inside <think> (%): " + ", ".join(
                f"{b} {v:.1f}" for b, v in cut.items()) + "; consider a larger --max-new-tokens")
    return report


def main(argv=None):
    args = parse_args(argv)
    try:
        report = run(args)
    except InputError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eval.py: interrupted; finished results are in {args.out!r} (--resume continues).",
              file=sys.stderr)
        return 130
    if report["failed"]:
        print(f"eval.py: {len(report['failed'])} model(s) could not be scored: "
              f"{', '.join(report['failed'])}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
