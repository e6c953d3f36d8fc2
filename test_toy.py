"""The miniature (toy.py): its world, every row of its table and what each must show, its cache,
its progress bar. The world is smoke-sized here (a few steps of every stage)."""
import json
import os
import signal
import sys

import pytest
import torch

import frism
import toy
from test_frism import merged_model, signalled_when_marked

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the paper in miniature (toy.py), smoke-sized --------------------------------------------

# What each row of the miniature must show in its output: (row-name pattern, check of its report).
# A new line of toy.MINIATURE needs its expectation here.
ROW_EXPECTATIONS = [
    ("VLM", lambda report: report is None),  # the VLM itself, no merge
    ("TA [0-9]*", lambda r: r["method"] == "ta"),
    ("TIES", lambda r: r["method"] == "ties"),
    ("DARE", lambda r: r["method"] == "dare"),
    ("IP T=*", lambda r: r["method"] == "ip"),
    ("selective *", lambda r: r["method"] == "selective"),
    ("STAR *", lambda r: r["method"] == "star"),
    ("TSV *", lambda r: r["method"] == "tsv"),
    ("FRISM *", lambda r: r["objective"].startswith("eq10") and len(r["loss_curve"]) == 2),
    ("FRISM open *", lambda r: r["args"]["gate_init"] == 4.0),
    ("entropy *", lambda r: r["objective"].startswith("entropy") and "kl" not in r["loss_curve"][0]
     and r["calibration"]["teacher_passes"] == 0),
    ("oracle *", lambda r: "toy.oracle" in r["objective"] and "chain_ce" in r["loss_curve"][0]),
    ("oracle open *", lambda r: r["args"]["gate_init"] == 4.0),
    ("dual *", lambda r: r["objective"].startswith("dual") and "kl_text" in r["loss_curve"][0]
     and r["text_stream"]["answers"] > 0 and r["args"]["max_new_tokens"] == 40),
    ("dual open *", lambda r: r["args"]["gate_init"] == 4.0),
    ("TA top-*", lambda r: r["args"]["no_train"] and r["args"]["lam"] == 1.0),
    ("band *", lambda r: r["args"]["no_train"] and r["args"]["band"]),
    ("FRISM alpha=0.1 lam=*", lambda r: r["args"]["alpha"] == 0.1),
]


def row_report(summary, name):
    path = summary["per_seed"][0]["models"][name]
    for file in ("frism_report.json", "baselines_report.json"):
        if os.path.exists(os.path.join(path, file)):
            return json.loads(open(os.path.join(path, file)).read())
    return None


def test_toy_world_runs_end_to_end(tmp_path):
    """A few steps of every stage: the world trains, is checked, scanned, merged by every row of
    the miniature's table (--full), scored, plotted; each row made as its line says."""
    import fnmatch
    assert toy.main(["--dir", str(tmp_path), "--smoke", "--full"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["world_check"]) == {"LRM", "BASE", "VLM", "ideal"}
    assert {"text_reasoning", "marker_reasoning"} <= summary["world_check"]["LRM"].keys()
    assert {"perception", "vl_reasoning"} <= summary["world_check"]["ideal"].keys()
    names = [name for line in toy.MINIATURE for name in line.rows()]
    assert list(summary["rows"]) == names and len(set(names)) == len(names)  # the table's order
    assert all(0 <= low <= mean <= high <= 100 for row in summary["rows"].values()
               for column, (mean, low, high) in row.items() if column != "scan_kl")
    assert all("scan_kl" in summary["rows"][f"TA {lam}"] for lam in toy.LAMBDAS)
    assert -1 <= summary["scan_spearman"][0] <= 1
    assert summary["lambda_rule"][0]["pick"] in toy.LAM_GRID
    for name in names:
        checks = [check for pattern, check in ROW_EXPECTATIONS if fnmatch.fnmatchcase(name, pattern)]
        assert checks, f"row {name!r} has no expectation in ROW_EXPECTATIONS"
        assert all(check(row_report(summary, name)) for check in checks), name
    report = row_report(summary, "FRISM lam=2.0 alpha=1.0")
    assert report["args"]["lam"] == 2.0 and report["calibration"]["questions"] == 8
    assert row_report(summary, "band 5-16 lam=1.0")["args"]["band"] == [5, 16]
    assert row_report(summary, "TA top-4")["args"]["rank"] == 4  # at lambda 1, as the plot says
    for plot in ("tradeoff.png", "gates.png", "bands.png", "lam.png", "curvature.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    reading = summary["per_seed"][0]["reading"]  # the second-order reading, with --full
    record = json.loads(open(summary["per_seed"][0]["reading_record"]).read())["reading"]
    assert set(reading["rows"]) == set(toy.READ_ROWS)
    assert all(len(gates) == reading["directions"] == len(record["per_direction"]["h"])
               for gates in record["per_direction"]["gates"].values())
    assert all(0 <= row["opened"] <= 1 for row in reading["rows"].values())
    for start in ("paper", "open "):  # the dual rows' settings, chosen on the held-out split
        assert summary["chosen"][start][0]["row"].startswith("dual ")

    # --only: the named rows made anew, every other row kept from the last run
    runs = tmp_path / "seed-0" / "runs"
    before = {p.name: p.stat().st_mtime_ns for p in runs.iterdir() if p.is_dir()}
    assert toy.main(["--dir", str(tmp_path), "--smoke", "--only", "entropy lam=1.0*",
                     "TSV (α grid)"]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert list(again["rows"]) == names  # the cached rows beside the new ones, in the same order
    assert again["per_seed"][0]["scan_kl"] == summary["per_seed"][0]["scan_kl"]
    assert again["lambda_rule"][0]["steep_at"] == summary["lambda_rule"][0]["steep_at"] == \
        toy.rule_pick(summary["per_seed"][0]["scan_kl"])[0]  # the scan's, not a stale one
    made = {"entropy_lam-1.0_alpha-0.1", "entropy_lam-1.0_alpha-1.0"} | {
        f"TSV_{lam}" for lam in toy.LAMBDAS}
    after = {p.name: p.stat().st_mtime_ns for p in runs.iterdir() if p.is_dir()}
    assert {name for name in before if after[name] != before[name]} == made
    assert sorted(again["per_seed"][0]["only"]) == sorted(
        n for n in names if n.startswith("entropy lam=1.0") or n.startswith("TSV "))
    assert toy.main(["--dir", str(tmp_path), "--smoke", "--only", "TIES"]) == 0  # a second
    third = json.loads((tmp_path / "summary.json").read_text())
    assert third["lambda_rule"][0]["steep_at"] == summary["lambda_rule"][0]["steep_at"]
    with pytest.raises(SystemExit, match="names no row") as refused:
        toy.main(["--dir", str(tmp_path), "--smoke", "--only", "no such method"])
    assert all(f"{line.label}: " in str(refused.value) for line in toy.MINIATURE)  # every name

    assert toy.main(["--dir", str(tmp_path), "--smoke", "--seeds", "2"]) == 0  # seed 0 reused
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == 2 and len(summary["per_seed"]) == 2


def test_the_oracle_trains_only_gate_parameters_on_labelled_chains(trio, tmp_path):
    """toy.py's oracle is frism.py's training loop with another objective: KL + cross-entropy on
    VL-reasoning chains. It moves the gates, nothing else, and differently from Eq. 10."""
    model, processor, gated, args = merged_model(trio, "--steps", "3", "--gate-init", "4")
    chains = toy.reasoning_chains(processor, 8, seed=0)
    assert all(c.question == toy.VL_REASONING_QUESTION and c.ids[-1] ==
               processor.tokenizer.convert_tokens_to_ids("<|im_end|>") for c in chains)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".g")}
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    objective = toy.oracle(8, seed=0)(model, processor, gated, answers, args)
    batch, mask = frism.make_batch(processor, chains[:8], args.device)
    targets = batch["input_ids"].roll(-1, dims=1)[mask]
    assert torch.equal(targets, torch.tensor([t for c in chains[:8] for t in c.ids]))
    history = frism.train(model, processor, gated, answers, frism.Teacher(
        model, processor, gated, answers, args), objective, args)
    assert {"loss", "kl", "chain_ce", "mean_gate"} <= history[-1].keys()
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(not torch.all(l.g == 4.0) for l in gated.values())


def test_the_scan_rank_correlation_is_the_spearman_coefficient():
    assert toy.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert toy.spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert toy.spearman([1, 2, 3], [1, 1, 1]) == 0.0
    # ranks 1, 2.5, 2.5, 4 against 1..4: the textbook value with a tie
    assert toy.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)


@pytest.mark.toy
def test_the_scans_kl_rises_where_task_arithmetics_perception_falls(tmp_path):
    """The lambda scan, validated where perception can be measured: over the miniature's Task
    Arithmetic grid (seed 0), its label-free KL against TA's toy perception has a rank
    correlation of -0.8 or below. Uses the world `python toy.py` cached, else builds one."""
    import baselines
    world = os.path.join(HERE, "toy_world", "seed-0", "world")
    if toy.why_rebuild(world, toy.world_recipe(0, False)) is not None:  # not cached as today's
        toy.ensure_world(str(tmp_path), 0, smoke=False)
        world = str(tmp_path / "world")
    data = toy.write_benchmarks(str(tmp_path / "benchmarks"), 100, seed=1)
    kl = toy.scan(world, data, str(tmp_path / "scan"))
    models = {}
    for lam in toy.LAMBDAS:
        models[f"TA {lam}"] = str(tmp_path / f"ta-{lam}")
        assert baselines.main(["ta", "--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base",
                               f"{world}/base", "--lam", str(lam), "--out",
                               models[f"TA {lam}"]]) == 0
    rows = toy.score(models, [data["perception"]], str(tmp_path / "scores.json"))
    rho = toy.spearman([kl[name] for name in models], [rows[name]["perception"] for name in models])
    assert rho <= -0.8, (kl, rows)


def test_toy_tokenizer_gives_every_digit_one_token():
    tok = toy.make_tokenizer(["0123456789"], vocab_size=256 + len(toy.SPECIAL_TOKENS))
    assert len(tok) == 263
    assert len(tok("6 x 7 = 42.").input_ids) == len("6 x 7 = 42.")
    text = toy.prompt("What number is shown?") + toy.perceive(3)
    assert tok.decode(tok(text).input_ids) == text
    processor = toy.make_processor(tok)  # the hand-written prompt is the chat template's
    messages = [{"role": "user", "content": "What number is shown?"}]
    assert toy.prompt("What number is shown?") == processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)




# ---- the cache: a world or a row is reused only when finished and made by today's code -------

@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    """A finished smoke-sized world of seed 0, for the tests below to copy."""
    root = tmp_path_factory.mktemp("cached") / "seed-0"
    toy.ensure_world(str(root), 0, smoke=True)
    return root


def copy_of(smoke_world, tmp_path):
    import shutil
    shutil.copytree(smoke_world, tmp_path / "seed-0")
    return tmp_path


def run_toy(capsys, *argv):
    """toy.main in this process: (exit code, stdout, stderr)."""
    code = toy.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# toy.py with a pause in one stage, to be stopped there by a real signal: "world" pauses in the
# world's second training stage (the LRM's), "row" in the first training step of a FRISM row.
STOPPABLE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
import frism, toy
def pause(*_):
    open(sys.argv[2], "w").close()
    time.sleep(120)
if sys.argv[1] == "world":
    fit, calls = toy.fit, []
    def paused_fit(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            pause()
        return fit(*a, **k)
    toy.fit = paused_fit
if sys.argv[1] == "row":
    inject_loss = frism.inject_loss
    frism.inject_loss = lambda gated: (pause(), inject_loss(gated))[1]
sys.exit(toy.main(sys.argv[3:]))
"""


def stopped(tmp_path, stage, sig, *argv):
    """Run toy.py in a process of its own, send it `sig` once it is inside `stage`."""
    mark = tmp_path / "reached"
    return signalled_when_marked([sys.executable, "-c", STOPPABLE, stage, str(mark), *argv],
                                 mark, sig)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_world_stopped_while_it_trains_is_never_taken_for_a_world(tmp_path, capsys, sig):
    """Ctrl-C removes the half-built world and says so in one line; after SIGKILL it stays in a
    staging directory, which the next run removes (one line) before it builds the world again
    (one line, with how long that takes, since --only runs on cached worlds)."""
    code, out, err = stopped(tmp_path, "world", sig, "--dir", str(tmp_path), "--smoke", "--only",
                             "TA 1.0")
    root = tmp_path / "seed-0"
    assert not (root / "world").exists()
    left = [p.name for p in root.iterdir() if p.name.startswith("world.partial-")]
    if sig == signal.SIGINT:
        assert code == 130 and "Traceback" not in err and left == []
        assert err.strip().splitlines()[-1].startswith("toy.py: interrupted")
    else:
        assert code == -signal.SIGKILL and len(left) == 1
    code, out, _ = run_toy(capsys, "--dir", str(tmp_path), "--smoke", "--only", "TA 1.0")
    assert code == 0 and (root / "world" / "world.json").is_file()
    lines = out.splitlines()
    assert any(line.startswith("toy.py: --only runs on cached worlds, and none is cached for "
                               "seed 0") and "minutes" in line for line in lines)
    assert any(line.startswith("toy.py: removed 1 world(s)") for line in lines) == (
        sig == signal.SIGKILL)
    assert [p.name for p in root.iterdir() if p.name.startswith("world.partial-")] == []


def test_a_row_killed_while_it_is_made_is_made_again_and_finished_rows_are_kept(
        smoke_world, tmp_path, capsys):
    root = copy_of(smoke_world, tmp_path)
    assert run_toy(capsys, "--dir", str(root), "--smoke", "--only", "TA 1.0")[0] == 0
    code, _, _ = stopped(tmp_path, "row", signal.SIGKILL, "--dir", str(root), "--smoke",
                         "--only", "FRISM lam=1.0 alpha=0.1")
    assert code == -signal.SIGKILL
    runs = root / "seed-0" / "runs"
    assert not (runs / "FRISM_lam-1.0_alpha-0.1.json").exists()  # no record: not finished
    args = toy.parse_args(["--dir", str(root), "--smoke"])
    jobs, reused, _ = toy.plan(str(root / "seed-0"), 0, args, rebuilt=False)
    assert "TA 1.0" in reused and "FRISM lam=1.0 alpha=0.1" in [job.name for job in jobs]
    assert run_toy(capsys, "--dir", str(root), "--smoke", "--only", "FRISM lam=1.0*")[0] == 0
    assert json.loads((runs / "FRISM_lam-1.0_alpha-0.1.json").read_text())["scores"]


def test_a_cached_world_unreadable_older_or_made_by_other_code_is_rebuilt_with_one_line(
        smoke_world, tmp_path, capsys):
    root = copy_of(smoke_world, tmp_path)
    world, recipe = root / "seed-0" / "world", toy.world_recipe(0, True)
    record = json.loads((world / "world.json").read_text())
    assert toy.why_rebuild(str(world), recipe) is None
    for change, why in [
            (lambda r: r["recipe"]["settings"]["stages"]["lrm"].update(steps=1),
             "it is from an older recipe (stages changed)"),
            (lambda r: r["recipe"].update(code="0" * 16),
             "it was built by another version of toy.py's world code"),
            (lambda r: r["recipe"]["versions"].update(torch="1.0"),
             "it was built with other library versions (torch changed)")]:
        changed = json.loads(json.dumps(record))
        change(changed)
        (world / "world.json").write_text(json.dumps(changed))
        assert toy.why_rebuild(str(world), recipe) == why
    (world / "world.json").write_text("{not json")
    assert toy.why_rebuild(str(world), recipe).startswith("it is unfinished or unreadable")
    (world / "world.json").write_text(json.dumps(record))
    with open(world / "vlm" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert toy.why_rebuild(str(world), recipe).startswith("its vlm model is unreadable")
    code, out, err = run_toy(capsys, "--dir", str(root), "--smoke", "--only", "VLM")
    assert code == 0 and toy.why_rebuild(str(world), recipe) is None
    assert [line for line in out.splitlines() if "building its world again" in line] == [
        line for line in out.splitlines() if line.startswith("toy.py: seed 0: building its world "
                                                             "again")] != []
    assert "toy.py, every stage" in err and "left" in err  # one bar over the run's stages


def test_a_cached_row_unreadable_or_made_by_other_code_is_made_again_with_one_line(
        smoke_world, tmp_path, capsys):
    root = copy_of(smoke_world, tmp_path)
    assert run_toy(capsys, "--dir", str(root), "--smoke", "--only", "TA 1.0", "TIES")[0] == 0
    seed, args = str(root / "seed-0"), toy.parse_args(["--dir", str(root), "--smoke"])
    path = root / "seed-0" / "runs" / "TA_1.0.json"
    record = json.loads(path.read_text())
    path.write_text("{half a record")
    jobs, reused, _ = toy.plan(seed, 0, args, rebuilt=False)
    assert "TIES" in reused and "TA 1.0" in [job.name for job in jobs]
    assert "toy.py: seed 0: making 1 cached stage(s) again, its record is unreadable: TA 1.0." \
        in capsys.readouterr().out.splitlines()
    record["key"]["code"]["frism.py"] = "0" * 16
    path.write_text(json.dumps(record))
    jobs, reused, _ = toy.plan(seed, 0, args, rebuilt=False)
    assert "TA 1.0" in [job.name for job in jobs]
    assert "toy.py: seed 0: making 1 cached stage(s) again, made by another version of frism.py: " \
        "TA 1.0." in capsys.readouterr().out.splitlines()
    # --only shows it beside the rows it makes, and says that today's code would make it otherwise
    only = toy.parse_args(["--dir", str(root), "--smoke", "--only", "TIES"])
    jobs, reused, _ = toy.plan(seed, 0, only, rebuilt=False)
    assert [job.name for job in jobs] == ["TIES"] and "TA 1.0" in reused
    assert "toy.py: seed 0: 1 cached stage(s) shown beside --only's rows were made by another " \
        "version of frism.py; python toy.py makes them again." in capsys.readouterr().out


# ---- the second-order reading: its curvature estimate, checked against exact values ----------

def test_gates_set_per_item_give_each_item_the_model_with_its_own_gates(trio):
    model, processor, gated, args = merged_model(trio)
    answers = [frism.Answer(image, q, [100, 101]) for image, q in frism.load_calibration(args)[:3]]
    batch, mask = frism.make_batch(processor, answers, args.device)
    with torch.no_grad():
        shared = frism.answer_logp(model, batch, mask)
        sigma = {path: torch.sigmoid(layer.g).expand(3, 1, -1).clone()
                 for path, layer in gated.items()}
        sigma = {path: s * torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1) for path, s in sigma.items()}
        with toy.gates_set_to(gated, sigma):  # item 1 with every gate closed: the VLM
            per_item = frism.answer_logp(model, batch, mask)
        with frism.deltas_off(gated):
            vlm = frism.answer_logp(model, batch, mask)
    first, second = mask[0].sum().item(), mask[1].sum().item()
    torch.testing.assert_close(per_item[:first], shared[:first])
    torch.testing.assert_close(per_item[first:first + second], vlm[first:first + second])
    assert all(type(layer).effective_S is frism.GatedLinear.effective_S and
               "effective_S" not in vars(layer) for layer in gated.values())  # put back


def test_the_curvature_estimate_is_eq8s_exact_hessian_at_the_vlm(trio):
    """With every gate closed the merged model is the VLM, Eq. 8 is at its minimum and its
    Hessian is its Gauss-Newton part: toy.curvature's Monte Carlo estimate there agrees with the
    exact diagonal (double backward) within four of its standard errors, and Eq. 8's exact
    gradient is zero."""
    model, processor, gated, args = merged_model(trio, "--lam", "1")
    model.set_attn_implementation("eager")  # as toy.at_the_start: double backward
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    closed = {path: torch.zeros_like(layer.S) for path, layer in gated.items()}
    h, se = toy.curvature(model, processor, gated, answers, closed, draws=256, seed=0)
    paths = list(gated)
    directions = [(paths[k], i) for k in (0, 5, 9, 13) for i in (0, 3)]
    exact, grad = toy.exact_curvature(model, processor, gated, answers, closed, directions)
    assert all(g.abs().max() < 1e-6 for g in grad.values())
    assert max(exact) > 0
    for (path, i), value in zip(directions, exact):
        assert abs(h[path][i].item() - value) <= 4 * se[path][i].item() + 1e-4 * max(exact), \
            (path, i, h[path][i].item(), value, se[path][i].item())


# ---- the committed findings: what the README and docs/miniature.md say of the 3-seed summary ---

def committed_summary():
    return json.load(open(os.path.join(HERE, ".assets", "summary.json")))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_committed_summary_holds_the_premise_in_every_seed(seed):
    """The world the miniature stands on (`python toy.py --seeds 3 --full`, committed): the VLM
    alone answers no VL-reasoning item, Task Arithmetic at its best lambda transfers at least 30 %,
    and Task Arithmetic's perception falls along the lambda grid."""
    rows = committed_summary()["per_seed"][seed]["rows"]
    assert rows["VLM"]["vl_reasoning"] == 0
    ta = [rows[f"TA {lam}"] for lam in toy.LAMBDAS]
    assert max(r["vl_reasoning"] for r in ta) >= 30
    perception = [r["perception"] for r in ta]
    assert perception == sorted(perception, reverse=True), perception


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_committed_oracle_is_above_task_arithmetics_peak_in_every_seed(seed):
    """The ceiling of subspace gating: the oracle (open start, lam 1) has more perception than
    Task Arithmetic at the lambda where it transfers the most, and at least its VL reasoning."""
    rows = committed_summary()["per_seed"][seed]["rows"]
    peak = max((rows[f"TA {lam}"] for lam in toy.LAMBDAS),
               key=lambda r: (r["vl_reasoning"], r["perception"]))
    oracle = rows["oracle open lam=1.0"]
    assert oracle["perception"] > peak["perception"]
    assert oracle["vl_reasoning"] >= peak["vl_reasoning"]


def test_the_committed_summary_keeps_the_order_of_the_readmes_rows():
    """The order the README's table shows, in the mean over the seeds: in VL reasoning the VLM
    below FRISM from the paper's start (the default alpha, lam 1 and 2), FRISM below Task
    Arithmetic lambda 1, Task Arithmetic below the oracle from open gates; in perception Task
    Arithmetic below FRISM and the oracle, the VLM above every one of them."""
    rows = {name: {c: v[0] for c, v in row.items()} for name, row in
            committed_summary()["rows"].items()}
    frism_rows = [rows["FRISM lam=1.0 alpha=0.1"], rows["FRISM lam=2.0 alpha=0.1"]]
    vlm, ta, oracle = rows["VLM"], rows["TA 1.0"], rows["oracle open lam=1.0"]
    for frism_row in frism_rows:
        assert vlm["vl_reasoning"] < frism_row["vl_reasoning"] < ta["vl_reasoning"]
        assert ta["perception"] < frism_row["perception"] < vlm["perception"]
    assert ta["vl_reasoning"] < oracle["vl_reasoning"]
    assert ta["perception"] < oracle["perception"] < vlm["perception"]
