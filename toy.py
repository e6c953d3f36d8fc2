"""The paper in miniature: a base / LRM / VLM world small enough to build on a laptop, offline.

`python toy.py` trains, from scratch and on the CPU, three models of the real Hugging Face
classes (`Qwen2ForCausalLM`, `Qwen2_5_VLForConditionalGeneration`, a byte-level BPE tokenizer
trained with `tokenizers` under Qwen2's own pre-tokenizer, a real `Qwen2_5_VLProcessor`):

  BASE  a tiny LLM that knows the chat format, can copy a number and knows one-digit sums;
  LRM   BASE fine-tuned to chain them: "Add seven to it, then subtract four" -> a worked chain;
  VLM   BASE's weights as its language model, a vision tower trained to read a drawn digit.

It writes the benchmarks (perception: read the digit; VL reasoning: read it, then work the chain),
makes every row of the table of methods with baselines.py or frism.py, scores everything with
eval.py, and prints and plots each finding with its 95 % interval. frism.py stays the one file of
the method: the miniature only makes inputs for it and calls it. Its parts, each using only those
above it in this list (the folder miniature/):

  stats.py       intervals over worlds and items, paired differences, kappa, power
  progress.py    the progress bar over every stage, and what each stage weighs
  world.py       the world's recipe: tokenizer, images, the skill, the three models (and the
                 tests' tiny trio)
  benchmarks.py  the benchmarks, calibration set, text stream, held-out split, oracle's chains
  scoring.py     every model through eval.py, each item's outcome and chain log-likelihood kept
  rows.py        MINIATURE, the table of methods: one Line a method (a new method goes here)
  reading.py     the lambda scan, and the paper's second-order reading measured
  cache.py       what is reused and what is made again: worlds, records, --only
  findings.py    the world check, every figure's interval and paired difference, the choices on
                 the held-out split, the targets, the table's power
  report.py      what is printed
  plots.py       what is drawn

This file is the command: it plans every seed, builds the worlds, makes the rows, and writes
summary.json and the plots. The tests use world.build_tiny_trio and run this script with --smoke.
"""
import argparse
import json
import os
import sys
import time

from tqdm.auto import tqdm

from miniature import benchmarks, cache, findings, plots, progress, reading, report, rows, world


FIRST_SEED = 50  # the first fresh world of today's recipe (50-59 were built after it froze)


def parse_args(argv=None):
    import frism
    p = argparse.ArgumentParser(description="Build the toy world (cached) and compare Task "
                                "Arithmetic, the baselines and FRISM in it, offline, on the CPU.",
                                formatter_class=frism.HelpWithDefaults)
    p.add_argument("--dir", default="toy_world", help="where the worlds, merges and plots go")
    p.add_argument("--seeds", type=int, default=1, help="build this many worlds (each cached), "
                   "seeds --first-seed and on, and report every figure over them")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED, help="the first world's seed "
                   "(the world's recipe was set on seeds 20-49 and 100 and up, which no reported "
                   "table uses)")
    p.add_argument("--rebuild", action="store_true", help="retrain the worlds even if cached")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps of everything: checks the pipeline, shows nothing")
    p.add_argument("--items", type=int, default=300, help="items per benchmark (and per held-out "
                   "split), balanced over digits and depths")
    p.add_argument("--full", action="store_true", help="also the rows marked full in MINIATURE "
                   "(the objectives beside FRISM, the oracle, the dual objective, bands and ranks, "
                   "FRISM over lam, each start's control) and the second-order reading")
    p.add_argument("--only", nargs="+", metavar="NAME", help="make and score only these rows (a "
                   "line's label, a row's name, or a pattern such as 'entropy*'), full or not, "
                   "and show them beside every row cached on the same worlds")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.items < 1 or args.first_seed < 0:
        p.error("--seeds and --items must be positive, --first-seed at least 0")
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
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


def about(seconds):
    """A build time as a person would say it."""
    return f"about {seconds:.0f} seconds" if seconds < 60 else f"about {seconds / 60:.0f} minutes"


def run(args):
    """Plan every seed (what is cached, what must be made), build the worlds, make the rows,
    print the findings and the stage timer, save the summary and the plots."""
    rows.selected(args.only, args.full)  # an unknown --only name is refused before any work
    started = time.time()
    roots = {seed: os.path.join(args.dir, f"seed-{seed}") for seed in args.seed_list}
    builds, weight = {}, progress.world_weight(world.stages(args.smoke))
    for seed, root in roots.items():
        path = os.path.join(root, "world")
        why = "--rebuild" if args.rebuild else None if not os.path.exists(path) else \
            cache.why_rebuild(path, cache.world_recipe(seed, args.smoke))
        if os.path.exists(path) and why is None:
            continue
        builds[seed] = why
        takes = f"{about(weight)} on a 2-core CPU"
        if args.only and why is None:
            print(f"toy.py: --only runs on cached worlds, and none is cached for seed {seed} in "
                  f"{root}: building it first ({takes}).")
        elif why is not None:
            print(f"toy.py: seed {seed}: building its world again ({takes}): {why}.")
    plans = {seed: cache.plan(root, seed, args, seed in builds) for seed, root in roots.items()}
    bar = progress.Progress(len(builds) * weight +
                            sum(job.weight for jobs, _, _ in plans.values() for job in jobs))
    # Every world first: frism.py fixes glibc's mmap threshold for the rest of its process (see
    # frism.frugal_host_memory), which slows the many small allocations of training a world.
    world_times = {}
    for seed in builds:
        with bar.stage(f"seed {seed}: world", weight):
            world_times[seed] = cache.ensure_world(roots[seed], seed, args.smoke, bar)
    seeds = [one_seed(roots[seed], seed, args, *plans[seed], bar, world_times.get(seed, {}))
             for seed in args.seed_list]
    bar.close()
    summary = {"seeds": len(seeds), "seed_list": args.seed_list, "items": args.items,
               "full": args.full, "only": args.only, "per_seed": seeds,
               "findings": findings.summarize(seeds)}
    report.print_all(summary, args.only)
    with open(os.path.join(args.dir, "summary.json"), "w") as f:
        json.dump(summary, f, separators=(",", ":"))
    for path in plots.plot(summary, seeds, args.dir):
        print(f"plot: {path}")
    print(f"done in {time.time() - started:.0f} s")
    return 0


def item_meta(data):
    """Each benchmark item's digit and depth, in the order eval.py scores them, and how many
    distinct problems (digit and chain) the VL-reasoning benchmark asks."""
    out = {}
    for name in ("perception", "vl_reasoning", "text_reasoning", "marker_reasoning"):
        with open(data[name]) as f:
            items = [json.loads(line) for line in f if line.strip()]
        out[name] = {key: [item.get(key) for item in items] for key in ("digit", "depth")}
        if name == "vl_reasoning":
            out[name]["problems"] = len({(item["digit"], item["reference"]) for item in items})
    return out


def one_seed(root, seed, args, jobs, reused, data, bar, world_times):
    """Write this seed's benchmarks, make its jobs (each recorded as soon as it is made, so that
    an interrupted run loses only the stage in progress), and gather its records."""
    runs = os.path.join(root, "runs")
    os.makedirs(runs, exist_ok=True)
    world.TIMES.clear()
    world.TIMES.update(world_times)
    benchmarks.write_benchmarks(os.path.join(root, "benchmarks"), 4 if args.smoke else args.items,
                                seed + 1)
    records, times = dict(reused), dict(world_times)
    for job in jobs:
        started = time.perf_counter()
        with bar.stage(f"seed {seed}: {job.name}", job.weight):
            record = job.make()
        cache.remember(job.path, job.key, record)
        records[job.name] = record
        if "seconds" in record:  # a row: its merge (of it, the LRM's answers) and its scoring
            times[f"merge {job.name}"] = record["seconds"]["merge"]
            if record["seconds"].get("lrm_answers"):
                times[f"of it, LRM answers {job.name}"] = record["seconds"]["lrm_answers"]
            times[f"scoring {job.name}"] = record["seconds"]["scoring"]
        else:
            times[job.name] = time.perf_counter() - started
    check, kl = records.pop("world check")["check"], records.pop("lambda scan")["kl"]
    read = records.pop(reading.STAGE, {}).get("reading")
    made = {name: records[name] for name in rows.selected(None, True) if name in records}
    return {"seed": seed,
            "world_check": {model: r["scores"] for model, r in check.items()},
            "world_items": {model: r["items"] for model, r in check.items()},
            "meta": item_meta(data),
            "rows": {name: dict(r["scores"], **({"scan_kl": kl[name]} if name in kl else {}))
                     for name, r in made.items()},
            "items": {name: r["items"] for name, r in made.items()},
            "logp": {name: r["logp"] for name, r in made.items()},
            "val": {name: r["val"]["scores"] for name, r in made.items() if "val" in r},
            "val_items": {name: r["val"]["items"] for name, r in made.items() if "val" in r},
            "models": {name: r["model"] for name, r in made.items()}, "scan_kl": kl,
            "reading": read and {k: v for k, v in read.items() if k != "per_direction"},
            "reading_record": os.path.join(runs, f"{rows.row_dir(reading.STAGE)}.json")
            if read else None,
            "only": sorted(rows.selected(args.only, True)) if args.only else None,
            "made": [job.name for job in jobs], "seconds": times}


if __name__ == "__main__":
    sys.exit(main())
