"""The miniature's cache: everything a run makes is kept under DIR/seed-S/ (the world, then one
record per stage in runs/) and reused only if today's code would make it the same way. A world is
built in a staging directory and renamed into place when complete; a record is written atomically;
what a killed run left half-made is removed, in one line. Uses world, benchmarks, rows, scoring,
reading and progress."""
import ast
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Callable, NamedTuple

import torch

from miniature import benchmarks, progress, reading, rows, scoring, world

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What makes and scores a row: a change to any of these (as Python parses it: comments and
# docstrings aside) makes the cached rows again. The world's own code is world.py.
CODE = ("frism.py", "baselines.py", "eval.py", "miniature/world.py", "miniature/benchmarks.py",
        "miniature/rows.py", "miniature/scoring.py", "miniature/reading.py")


def digest(value):
    """A short fingerprint of anything JSON can write."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def code_of(file):
    """What a source file does, as Python parses it: its comments and docstrings are not part of
    it, so a change to the words alone makes no cached world or row stale."""
    with open(os.path.join(HERE, file)) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def world_recipe(seed, smoke):
    """What one seed's world is made from: its settings, the code that builds it (world.py) and
    the libraries that run it."""
    import tokenizers
    import transformers
    import frism
    return json.loads(json.dumps({
        "settings": {"seed": seed, "smoke": smoke, "stages": world.stages(smoke),
                     "text": world.WORLD_TEXT, "vision": world.WORLD_VISION,
                     "merged": frism.MERGED},
        "code": digest(code_of("miniature/world.py")),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__}}))


def changed(made, now):
    """The keys whose values differ between two dicts, as a phrase."""
    keys = [k for k in now if not isinstance(made, dict) or made.get(k) != now[k]]
    return ", ".join(keys) + " changed"


def why_rebuild(path, recipe):
    """Why the cached world at `path` cannot be reused; None if it can. Only a directory that a
    finished build renamed into place holds world.json, so an interrupted one is never taken for
    a world."""
    import frism
    try:
        with open(os.path.join(path, "world.json")) as f:
            made = json.load(f)["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return "it is unfinished or unreadable (no readable world.json)"
    for part, why in (("settings", "it is from an older recipe"),
                      ("code", "it was built by another version of the world's code"),
                      ("versions", "it was built with other library versions")):
        if not isinstance(made, dict) or made.get(part) != recipe[part]:
            return why + (f" ({changed(made.get(part), recipe[part])})" if part != "code" and
                          isinstance(made, dict) else "")
    for model in ("base", "lrm", "vlm", "ideal"):
        try:
            frism.check_files(os.path.join(path, model), model)
        except frism.InputError as e:
            return f"its {model} model is unreadable ({e})"
    return None


def remove_left_behind(root):
    """What a killed run left half-made under one seed's directory, removed in one line each:
    worlds (world.partial-PID-...) and records (runs/NAME.json.partial-PID) of dead processes."""
    import frism
    for where, pattern, what in (
            (root, re.compile(r"world\.partial-(\d+)-\w+"), "world(s) that a stopped run left "
                                                             "half-built"),
            (os.path.join(root, "runs"), re.compile(r".+\.json\.partial-(\d+)"),
             "record(s) that a stopped run left half-written")):
        entries = sorted(os.listdir(where)) if os.path.isdir(where) else []
        left = [e for e in entries if pattern.fullmatch(e) and
                not frism.process_alive(int(pattern.fullmatch(e).group(1)))]
        for entry in left:
            path = os.path.join(where, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        if left:
            print(f"toy.py: removed {len(left)} {what} in {where}: {', '.join(left)}.")


def ensure_world(root, seed, smoke, bar=None):
    """Build one seed's world in a staging directory and rename it into place when it is
    complete: Ctrl-C or SIGKILL at any moment leaves the last finished world or none. The rows of
    the world it replaces go with it. Returns its stage times."""
    path = os.path.join(root, "world")
    os.makedirs(root, exist_ok=True)
    remove_left_behind(root)
    staging = tempfile.mkdtemp(prefix=f"world.partial-{os.getpid()}-", dir=root)
    world.TIMES.clear()
    try:
        tick = (lambda stage: bar.advance(progress.ESTIMATES[stage])) if bar else None
        world.build_world(staging, smoke=smoke, seed=seed, **({"tick": tick} if tick else {}))
        with open(os.path.join(staging, "world.json"), "w") as f:
            json.dump({"recipe": world_recipe(seed, smoke), "seconds": world.TIMES}, f, indent=1)
        shutil.rmtree(os.path.join(root, "runs"), ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dict(world.TIMES)


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
    """Write a record atomically: a killed run leaves the previous record or none, never half
    (its .partial-PID file is removed by the next run, remove_left_behind)."""
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(record, key=key), f)
    os.replace(tmp, path)


class Job(NamedTuple):
    """A stage of one seed that is not cached: what it makes, where its record goes, and its
    weight on the progress bar."""
    name: str
    path: str
    key: dict
    weight: float
    make: Callable  # () -> the record (a dict)


def make_row(name, program, argv, out, path, data, smoke, validate=False):
    """Merge (or, for the VLM alone, nothing), then score (and, for a line whose settings are
    chosen, score on the held-out split too): the row's record."""
    started = time.perf_counter()
    if program is None:
        model = f"{path}/vlm"
    elif code := program(argv + ["--out", out, "--overwrite"]):
        if code == 130:  # frism.py and baselines.py end a Ctrl-C with 130: so does toy.py
            raise KeyboardInterrupt
        raise SystemExit(f"toy.py: {name}: the merge failed")
    else:
        model = out
    merged = time.perf_counter()
    record = dict(scoring.score({name: model}, [data["perception"], data["vl_reasoning"]],
                                f"{out}.eval.json", smoke)[name], model=model)
    if validate:
        val = scoring.score({name: model}, [data["val_perception"], data["val_vl_reasoning"]],
                            f"{out}.val.json", smoke)[name]
        record["val"] = {part: {k.removeprefix("val_"): v for k, v in val[part].items()}
                         for part in ("scores", "items")}
    seconds = {"merge": merged - started, "scoring": time.perf_counter() - merged}
    if os.path.isfile(os.path.join(out, "frism_report.json")):  # frism.py's own stage timer
        with open(os.path.join(out, "frism_report.json")) as f:
            seconds["lrm_answers"] = json.load(f)["seconds"].get("lrm_answers")
    return dict(record, seconds=seconds)


def stages_of(path, runs, data, seed, smoke):
    """{name: (weight on the progress bar, settings, make)}: every stage a seed's table can hold,
    in its order: the world check, the lambda scan, every row of MINIATURE, the reading."""
    inputs = rows.Seed(path, data, seed, smoke)
    out = {"world check": (progress.ESTIMATES["world check"], None,
                           lambda: {"check": scoring.world_check(path, data, runs, smoke)}),
           "lambda scan": (progress.ESTIMATES["lambda scan"], None,
                           lambda: {"kl": reading.scan(path, data, os.path.join(runs, "scan"))})}
    for name, (line, value) in rows.selected(None, True).items():
        program, argv = line.make(value, inputs) if line.make else (None, None)
        validate = value in line.validate
        out[name] = (progress.row_weight(program, argv, validate, benchmarks.TEXT_PROMPTS), argv,
                     functools.partial(make_row, name, program, argv,
                                       os.path.join(runs, rows.row_dir(name)), path, data, smoke,
                                       validate))
    out[reading.STAGE] = (progress.ESTIMATES["reading"], list(reading.READ_ROWS),
                          lambda: reading.second_order_reading(path, data, runs, seed, smoke))
    return out


def plan(root, seed, args, rebuilt):
    """What this seed's run makes (Jobs, in the table's order) and what it reuses ({name: record}).
    A record is reused only if it was made on this world, on these items, by today's code, with
    these settings; else it is made again, and one line per reason says why. With --only the
    named rows are made, and every other stage recorded on this world is shown beside them,
    whoever made it (one line counts those that today's code would make otherwise)."""
    path, runs = os.path.join(root, "world"), os.path.join(root, "runs")
    remove_left_behind(root)
    data = {name: os.path.join(root, "benchmarks", f"{name}.jsonl") for name in benchmarks.FILES}
    common = {"world": digest(world_recipe(seed, args.smoke)),
              "benchmarks": {"items": 4 if args.smoke else args.items, "seed": seed + 1},
              "code": {file: digest(code_of(file)) for file in CODE}, "run": None}
    wanted = {"world check", "lambda scan", *rows.selected(args.only, args.full)} | (
        {reading.STAGE} if args.full else set())  # what this run makes, if not cached
    jobs, reused, remade, others = [], {}, {}, {}
    named_rows = rows.selected(args.only, True) if args.only is not None else {}
    for name, (weight, argv, make) in stages_of(path, runs, data, seed, args.smoke).items():
        record_path, key = os.path.join(runs, f"{rows.row_dir(name)}.json"), dict(common, run=[
            name, *(argv or [])])
        named = name in named_rows
        if args.only is not None and not named:  # shown beside --only's rows, if recorded here
            record = None if rebuilt else recall(record_path, key, ("world", "benchmarks"))[0]
            if record is not None:
                reused[name] = record
                why = recall(record_path, key, ("code",))[1]
                if why:
                    others.setdefault(why, []).append(name)
                continue
        if name not in wanted and not named:
            continue
        record, why = (None, None) if rebuilt else recall(record_path, key)
        if record is not None and not named:
            reused[name] = record
            continue
        if why is not None and not named:
            remade.setdefault(why, []).append(name)
        jobs.append(Job(name, record_path, key, weight, make))
    for why, made in remade.items():
        print(f"toy.py: seed {seed}: making {len(made)} cached stage(s) again, {why}: "
              f"{', '.join(made[:3])}{', ...' if len(made) > 3 else ''}.")
    for why, shown in others.items():
        print(f"toy.py: seed {seed}: {len(shown)} cached stage(s) shown beside --only's rows "
              f"were {why}; python toy.py makes them again.")
    return jobs, reused, data
