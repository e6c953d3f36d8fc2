"""The documentation states what the code does: the forking page's code runs, links resolve, and
every figure of the README's miniature table is one the committed summary holds."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import toy
from test_toy import committed

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = ["frism.py", "baselines.py", "eval.py", "toy.py", "test_frism.py", "test_toy.py",
           "test_baselines.py", "conftest.py"] + [
    os.path.join("miniature", f) for f in sorted(os.listdir(os.path.join(HERE, "miniature")))
    if f.endswith(".py")]


def sections(path):
    """[(title, [(language, code)])] of a markdown page, one entry per "## " section."""
    text = open(path).read()
    out = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        blocks = re.findall(r"^```(\w+)\n(.*?)^```", part, flags=re.M | re.S)
        out.append((title, blocks))
    return out


FORKS = [(title, blocks) for title, blocks in sections(os.path.join(HERE, "docs", "forking.md"))
         if blocks]
WHERE = re.compile(r"# (\S+), (before|after|replace) the line: (.+)")


def apply(block, root):
    """Put a block where its first line says: before, after or instead of one line of a file,
    matched exactly (leading and trailing space aside) and only once."""
    first, _, code = block.partition("\n")
    file, how, anchor = WHERE.fullmatch(first.strip()).groups()
    path = os.path.join(root, file)
    lines = open(path).read().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.strip() == anchor.strip()]
    assert len(at) == 1, f"{file}: the line {anchor!r} is there {len(at)} times, not once"
    i = at[0]
    new = code.splitlines(keepends=True)
    lines[i:i + 1] = {"before": new + [lines[i]], "after": [lines[i]] + new, "replace": new}[how]
    open(path, "w").write("".join(lines))


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    """A smoke-sized miniature world, cached where `toy.py --only` looks for the default seed."""
    from miniature import cache
    root = tmp_path_factory.mktemp("toy")
    cache.ensure_world(str(root / f"seed-{toy.FIRST_SEED}"), toy.FIRST_SEED, smoke=True)
    return root


@pytest.mark.parametrize("title, blocks", FORKS, ids=[t.split(".")[0] for t, _ in FORKS])
def test_every_fork_of_the_forking_page_applies_and_runs(trio, smoke_world, tmp_path, title,
                                                         blocks):
    """Each section's Python blocks go into a copy of the project; its commands run there on the
    tiny trio (frism.py training with 2 steps and short answers, toy.py on a smoke world); every
    new row of the miniature is made, and meets its expectation."""
    root = tmp_path / "fork"
    (root / "miniature").mkdir(parents=True)
    for file in PROJECT:
        shutil.copy(os.path.join(HERE, file), root / file)
    for language, code in blocks:
        if language == "python":
            apply(code, root)
    env = dict(os.environ, VLM=trio["vlm"], LRM=trio["lrm"], BASE=trio["base"],
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    commands = []
    for language, code in blocks:
        for command in (c for c in code.splitlines() if c.strip() and language == "bash"):
            if command.startswith("python frism.py") and "--no-train" not in command:
                command += f" --data {trio['data']} --steps 2 --max-new-tokens 6"
            if command.startswith("python toy.py"):
                command += f" --smoke --dir {smoke_world}"
            commands.append(command)
    done = subprocess.run([sys.executable, "-c", COMMANDS, str(smoke_world), *commands],
                          cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    if title.startswith("1."):
        report = json.load(open(root / "merged-reverse-kl" / "frism_report.json"))
        assert report["objective"].startswith("reverse_kl")
        assert {"reverse_kl", "injected"} <= report["loss_curve"][-1].keys()
    if title.startswith("2."):
        import frism
        from safetensors.torch import load_file
        saved = load_file(root / "merged-shift" / frism.GATE_PARAMETERS)
        shifts = [v for k, v in saved.items() if k.endswith(".h")]
        assert len(shifts) == 14 and any(v.item() != 0 for v in shifts)  # trained and saved
        # every figure of the gates is the edited layer's own, S_eff / S = sigmoid(g + h)
        gates = load_file(root / "merged-shift" / frism.GATE_VALUES)
        for path, gate in gates.items():
            torch.testing.assert_close(gate, torch.sigmoid(saved[f"{path}.g"] + saved[f"{path}.h"]))
        report = json.load(open(root / "merged-shift" / "frism_report.json"))
        mean = torch.cat(list(gates.values())).mean().item()
        assert abs(report["loss_curve"][-1]["mean_gate"] - mean) < 1e-5
        # and the suite's properties of the gated layer hold for the edited one
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "layer", "-p",
                               "no:cacheprovider", "test_frism.py"], cwd=root, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:]
    if title.startswith("3."):
        help_text = subprocess.run([sys.executable, "baselines.py", "iso_c", "--help"], cwd=root,
                                   capture_output=True, text=True).stdout
        assert "isotropic task matrix" in " ".join(help_text.split())
        assert json.load(open(root / "merged-iso-c" / "baselines_report.json"))["method"] == \
            "iso_c"


# Run in the forked copy, in one interpreter (one start instead of one a command): each of a
# section's commands ("python PROGRAM ARGS", $VLM and the like expanded) as its program's
# __main__ would run it; then every row the fork added to the miniature's table must be in the
# summary that `toy.py --only` wrote, and its output meet its expectation in ROW_EXPECTATIONS.
COMMANDS = """
import fnmatch, json, os, runpy, shlex, sys
world, commands = sys.argv[1], sys.argv[2:]
for command in commands:
    sys.argv = shlex.split(os.path.expandvars(command))[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code:
            sys.exit(f"{command!r} exited with {e.code!r}")
import toy, test_toy
summary = json.load(open(os.path.join(world, "summary.json")))
new = summary["per_seed"][0]["only"]
assert new, "no row was made"
for name in new:
    assert name in summary["per_seed"][0]["rows"] and name in summary["findings"]["table"], name
    checks = [c for p, c in test_toy.ROW_EXPECTATIONS if fnmatch.fnmatchcase(name, p)]
    assert checks and all(c(test_toy.row_report(summary, name)) for c in checks), name
"""


def markdown_files():
    return [os.path.join(HERE, "README.md")] + sorted(
        os.path.join(HERE, "docs", f) for f in os.listdir(os.path.join(HERE, "docs"))
        if f.endswith(".md"))


def anchors(path):
    """GitHub's anchors of a page's headings."""
    heads = re.findall(r"^#+ (.+)$", open(path).read(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", markdown_files(), ids=os.path.basename)
def test_every_link_of_the_documentation_resolves(page):
    text = re.sub(r"```.*?```", "", open(page).read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        assert os.path.exists(path), f"{page}: {target}"
        if anchor:
            assert anchor in anchors(path), f"{page}: {target}"


def test_every_figure_of_the_readmes_miniature_table_is_in_the_committed_summary():
    """The README's table is `python toy.py --seeds N --full`'s summary, committed in .assets/
    (N >= 5 worlds): each row names its row of the summary in backticks, and each cell is that
    row's figure with its 95 % interval over worlds, or its paired difference to Task Arithmetic at
    the lambda chosen on the held-out split, as toy.py prints them."""
    from miniature import report
    summary = committed()
    assert summary["seeds"] >= 5 and summary["full"]
    readme = open(os.path.join(HERE, "README.md")).read()
    table = readme.split("<!-- miniature-table -->")[1].split("<!-- /miniature-table -->")[0]
    rows = [line.split("|")[1:-1] for line in table.strip().splitlines()[2:]]
    assert len(rows) >= 8
    found = summary["findings"]
    for first, *cells in rows:
        name = re.search(r"`([^`]+)`", first).group(1)
        figures, vs = found["table"][name], found["references"][name]["vs_ta"]
        assert [c.strip() for c in cells] == [
            report.cell(figures["perception"]), report.cell(figures["vl_reasoning"]),
            report.difference(vs["vl_reasoning"]), report.difference(vs["perception"])], name


CLAIM = re.compile(r"<!-- (claim|target|check|figure)(?:: (.+?))? -->")


def claims(page):
    """Every marked statement of a page: (kind, arguments, the text before the marker, back to the
    previous marker or the paragraph's start)."""
    text = open(os.path.join(HERE, page)).read()
    out, last = [], 0
    for m in CLAIM.finditer(text):
        start = max(text.rfind("\n\n", 0, m.start()), last)
        out.append((m.group(1), [a.strip() for a in (m.group(2) or "").split(";")],
                    " ".join(text[start:m.start()].split())))
        last = m.end()
    return out


@pytest.mark.parametrize("page", ["README.md", "docs/miniature.md"])
def test_every_comparison_the_docs_state_is_what_the_committed_summary_says(page):
    """A sentence that compares two rows carries a marker naming them and the axis (<!-- claim: A;
    B; axis -->): it must hold their paired difference with its 95 % interval and the word the
    interval allows (above, below, level, undecided), computed from the committed summary. A
    target (<!-- target: row -->) must say met, not met or undecided as its intervals do; the world
    check (<!-- check -->) how many reported worlds pass it; a quoted figure (<!-- figure: power,
    scan, pooled or rule -->) what the summary holds. A claim the data do not support fails here."""
    from miniature import report
    summary = committed()
    marked = claims(page)
    assert len(marked) >= (6 if page == "README.md" else 10)
    for kind, args, sentence in marked:
        if kind == "claim":
            a, b, axis = args
            expected = report.claim(summary, a, b, axis)
        elif kind == "target":
            expected = report.target_words(summary, args[0])
        elif kind == "figure":
            expected = report.figure_words(summary, args[0])
        else:
            expected = report.check_words(summary)
        assert expected in sentence, (page, args, expected, sentence)


def test_the_dry_run_plans_in_the_docs_are_what_the_code_prints(tmp_path, capsys):
    """memory-and-speed.md shows `--dry-run` on the paper's pairs by hub id, as it prints where only
    their published config.json files are at hand: run here on those configs, written locally."""
    import warnings
    import frism
    from test_frism import DIMS_3B, DIMS_7B, published, qwen2, qwen25_vl
    pairs = {
        "Qwen/Qwen2.5-VL-7B-Instruct": [published(tmp_path, n, c) for n, c in (
            ("vlm7", qwen25_vl(dict(DIMS_7B, rope_theta=1e6, max_position_embeddings=128000),
                               3584)),
            ("lrm7", qwen2(**DIMS_7B, rope_theta=1e4, max_position_embeddings=131072)),
            ("base7", qwen2(**DIMS_7B, rope_theta=1e4, max_position_embeddings=4096)))],
        "Qwen/Qwen2.5-VL-3B-Instruct": [published(tmp_path, n, c) for n, c in (
            ("vlm3", qwen25_vl(dict(DIMS_3B, rope_theta=1e6, max_position_embeddings=128000),
                               2048)),
            ("lrm3", qwen2(**DIMS_3B, rope_theta=1e6, max_position_embeddings=32768)),
            ("base3", qwen2(**DIMS_3B, rope_theta=1e6, max_position_embeddings=32768)))]}
    page = open(os.path.join(HERE, "docs", "memory-and-speed.md")).read()
    shown = re.findall(r"^\$ (python frism\.py .*?)\n(FRISM memory plan.*?)(?=^\$|^```)", page,
                       flags=re.M | re.S)
    assert len(shown) == 3  # the 7B and 3B pairs, and the 7B pair with --objective dual
    for command, output in shown:
        argv = command.replace("\\\n", " ").split()[2:]
        vlm = argv[argv.index("--vlm") + 1]
        rest = argv[argv.index("--base") + 2:]
        trio = pairs[vlm]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert frism.main(["--vlm", trio[0], "--lrm", trio[1], "--base", trio[2], *rest]) == 0
        printed = capsys.readouterr().out
        assert printed.strip() == output.strip(), command
