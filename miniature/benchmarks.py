"""The miniature's benchmarks and data sets, in eval.py's local form (.jsonl, images beside them):
what each merge is scored on, what frism.py trains on, and the held-out split on which settings
are chosen. Every item asks a held-out problem (world.Problem.held_out), never one the LRM trained
on; every file is balanced over digits, and the reasoning ones over depths too. Uses world."""
import json
import os
import random

from miniature import world

# Each name a file of the benchmark directory: the two benchmarks every row is scored on, the
# world check's two text-only ones (the LRM's skill in its own wording and in the marker form),
# frism.py's label-free calibration set (questions and images, no answers) and text stream
# (reasoning prompts in the LRM's wording, no answers), and the held-out split of both benchmarks
# (its items carry no reference chain: a setting is chosen on exact match alone, and eval.py
# reads no log-likelihood where there is no reference).
FILES = ("perception", "vl_reasoning", "text_reasoning", "marker_reasoning", "calib",
         "text_prompts", "val_perception", "val_vl_reasoning")
CALIBRATION = 32  # calibration questions (FRISM's VizWiz, in miniature)
TEXT_PROMPTS = 64  # the text stream's prompts: training problems, their answers never written


def balanced(n, rng, *axes):
    """n combinations of the axes' values, each combination as often as n allows (the rest drawn
    without repeats), in a shuffled order."""
    combos = [()]
    for axis in axes:
        combos = [c + (v,) for c in combos for v in axis]
    picks = combos * (n // len(combos)) + rng.sample(combos, n % len(combos))
    rng.shuffle(picks)
    return picks


def write_benchmarks(root, n, seed):
    """Write every file of FILES under root (n items each for the benchmarks and the held-out
    split); returns {name: path}. The items depend on the seed only."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)

    def image(name, d):
        world.draw_digit(d, rng).save(os.path.join(root, "images", name))
        return f"images/{name}"

    def perception(name, d):
        return {"image": image(name, d), "kind": "perception", "digit": d,
                "question": world.perception_question(rng), "answer": d}

    def vl_reasoning(name, problem, scored):
        return {"image": image(name, problem.digit), "kind": "reasoning", "digit": problem.digit,
                "depth": problem.depth, "question": world.vl_reasoning_question(problem, rng),
                "answer": problem.answer, **({"reference": problem.chain()} if scored else {})}

    def problems(count, held_out=True):
        return [world.draw_problem(rng, d, depth, held_out)
                for depth, d in balanced(count, rng, world.DEPTHS, range(10))]

    files = {name: [] for name in FILES}
    for split, prefix in (("", ""), ("val_", "v")):
        files[f"{split}perception"] = [perception(f"{prefix}p{i}.png", d) for i, (d,) in
                                       enumerate(balanced(n, rng, range(10)))]
        files[f"{split}vl_reasoning"] = [vl_reasoning(f"{prefix}r{i}.png", p, not split)
                                         for i, p in enumerate(problems(n))]
    for name, wording in (("text_reasoning", world.text_question),
                          ("marker_reasoning", world.marker_question)):
        files[name] = [{"kind": "reasoning", "digit": p.digit, "depth": p.depth,
                        "question": wording(p), "answer": p.answer} for p in problems(n)]
    files["calib"] = [{"image": image(f"c{i}.png", d), "question": world.perception_question(rng)}
                      for i, (d,) in enumerate(balanced(min(CALIBRATION, max(8, n)), rng,
                                                        range(10)))]
    files["text_prompts"] = [{"question": world.text_question(p)}
                             for p in problems(min(TEXT_PROMPTS, max(4, n)), held_out=False)]
    for name, items in files.items():
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return {name: os.path.join(root, f"{name}.jsonl") for name in files}


def reasoning_chains(processor, n, seed):
    """The oracle's labels: VL-reasoning questions about training problems (never a benchmark's)
    on fresh images, with the worked chain as the answer, as frism.py's teacher items."""
    import frism
    rng = random.Random(10_000 + seed)
    chains = []
    for depth, d in balanced(n, rng, world.DEPTHS, range(10)):
        problem = world.draw_problem(rng, d, depth, held_out=False)
        chains.append(frism.Answer(world.draw_digit(d, rng), world.vl_reasoning_question(
            problem, rng), processor.tokenizer(problem.chain() + "<|im_end|>").input_ids))
    return chains
