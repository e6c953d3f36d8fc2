"""What the miniature's records say, with how sure each saying is: the world check's properties
(the premise), every row's figures with their 95 % intervals, every row's paired difference to
its references (Task Arithmetic at the lambda chosen on the held-out split, the VLM, the row's
untrained start), the settings chosen on the held-out split (Task Arithmetic's lambda, the dual
objective's beta, alpha and lam), the targets, the lambda scan and rule against their chance
levels, and the table's power. Uses rows and stats; reads the per-seed summaries toy.py makes."""
from miniature import rows, stats

AXES = ("perception", "vl_reasoning")
LRM_FLOOR = 90.0  # the LRM on text, at every depth, in both wordings (world check)
PERCEPTION_BAND = (80.0, 92.0)  # the VLM's perception (world check)
PEAK_FLOOR, STEP_CEILING = 40.0, 0.35  # Task Arithmetic graded over lambda (world check)
TARGET = 0.8  # ours: the label-free target, 80 % of the oracle's VL reasoning at no less
NON_INFERIOR = 2.0  # perception, "no less" read as: the interval's lower end above -2 points


# ---- one seed ------------------------------------------------------------------------------

def by_depth(outcomes, depths, scale=100.0):
    """{depth: mean} of per-item outcomes (a string of 0 and 1: accuracy in %; or a list of
    numbers, with scale 1: the chain's log-likelihood) given each item's depth."""
    out = {}
    values = stats.outcomes(outcomes)
    for depth in sorted(set(depths)):
        picked = [v for v, d in zip(values, depths) if d == depth]
        out[str(depth)] = scale * sum(picked) / len(picked)
    return out


def depths(seeds):
    """{row: {"accuracy": {depth: mean over seeds}, "logp": {depth: ...}}} for every row every
    seed has: VL reasoning by depth, and the chain's log-likelihood by depth."""
    out = {}
    for name in seeds[0]["items"]:
        if not all(name in s["items"] for s in seeds):
            continue
        per = {"accuracy": [by_depth(s["items"][name]["vl_reasoning"],
                                     s["meta"]["vl_reasoning"]["depth"]) for s in seeds],
               "logp": [by_depth(s["logp"][name]["vl_reasoning"],
                                 s["meta"]["vl_reasoning"]["depth"], 1.0) for s in seeds]}
        out[name] = {kind: {d: stats.mean(p[d] for p in values if d in p)
                            for d in sorted(set().union(*values))}
                     for kind, values in per.items()}
    return out


def ta_grid(seed_summary):
    """Task Arithmetic's rows over rows.LAMBDAS that one seed has: [(lambda, row name)]."""
    return [(lam, f"TA {lam}") for lam in rows.LAMBDAS if f"TA {lam}" in seed_summary["rows"]]


def logp_against_accuracy(seeds):
    """The continuous metric against exact match over Task Arithmetic's grid: the rank correlation
    of the chain's mean log-likelihood with VL-reasoning accuracy, per seed and pooled."""
    per_seed, xs, ys = [], [], []
    for s in seeds:
        names = [name for _, name in ta_grid(s)]
        if len(names) < 2:
            return None
        x = [s["rows"][n]["vl_reasoning_logp"] for n in names]
        y = [s["rows"][n]["vl_reasoning"] for n in names]
        per_seed.append(stats.spearman(x, y))
        xs, ys = xs + x, ys + y
    return {"per_seed": per_seed, "pooled": stats.spearman(xs, ys)}


def graded(curve):
    """Task Arithmetic's VL reasoning and perception over its lambda grid [(lam, perception,
    vl_reasoning)] against the world check's rule: a peak of PEAK_FLOOR or more, at least three
    consecutive grid points at half the peak or more, no single step up carrying more than
    STEP_CEILING of the peak, at most 0.125 between the peak and its neighbours, and perception
    falling along the grid (ours: no step up of more than 3 points, the noise of a few items of
    300, and the last point 20 or more below the first). Returns the figures and whether each part
    holds."""
    lams = [lam for lam, _, _ in curve]
    reasoning = [r for _, _, r in curve]
    perception = [p for _, p, _ in curve]
    peak = max(reasoning)
    at = reasoning.index(peak)
    run = best = 0
    for r in reasoning:
        run = run + 1 if r >= peak / 2 else 0
        best = max(best, run)
    steps = [b - a for a, b in zip(reasoning, reasoning[1:])]
    largest = max(steps) if steps else 0.0
    spacing = max([lams[at] - lams[at - 1]] * (at > 0) + [lams[at + 1] - lams[at]] *
                  (at + 1 < len(lams)))
    rises = [b - a for a, b in zip(perception, perception[1:])]
    out = {"peak": peak, "peak_lambda": lams[at], "points_at_half_peak": best,
           "largest_step_share": largest / peak if peak else None, "spacing_at_peak": spacing,
           "perception_largest_rise": max(rises), "perception_drop": perception[0] -
           perception[-1]}
    out["holds"] = {
        "peak": peak >= PEAK_FLOOR, "wide": best >= 3,
        "no_jump": peak > 0 and largest <= STEP_CEILING * peak,
        "grid": len(lams) >= 7 and spacing <= 0.125,
        "perception_falls": max(rises) <= 3.0 and out["perception_drop"] >= 20}
    return out


def world_check(seed_summary):
    """The premise, in one seed: the LRM's skill at every depth in both wordings (items it never
    trained on), the VLM's perception in its band, Task Arithmetic graded over lambda."""
    check, meta = seed_summary["world_check"], seed_summary["meta"]
    lrm = {form: by_depth(seed_summary["world_items"]["LRM"][form], meta[form]["depth"])
           for form in ("text_reasoning", "marker_reasoning")}
    perception = check["VLM"]["perception"]
    curve = [(lam, seed_summary["rows"][name]["perception"],
              seed_summary["rows"][name]["vl_reasoning"]) for lam, name in ta_grid(seed_summary)]
    ta = graded(curve) if len(curve) == len(rows.LAMBDAS) else None
    holds = {"lrm": all(v >= LRM_FLOOR for form in lrm.values() for v in form.values()),
             "perception": PERCEPTION_BAND[0] <= perception <= PERCEPTION_BAND[1],
             "graded": ta is not None and all(ta["holds"].values())}
    return {"lrm_by_depth": lrm, "vlm_perception": perception, "ta_curve": curve,
            "ta_graded": ta, "holds": holds, "passes": all(holds.values())}


def choose(seed_summary, names):
    """The row among `names` that the held-out split chooses: the most perception plus VL
    reasoning there (ours: the two axes weigh the same; a tie goes to the first of `names`).
    None where none of them was scored on the split."""
    scored = [name for name in names if name in seed_summary["val"]]
    if not scored:
        return None
    val = seed_summary["val"]
    return max(scored, key=lambda n: (val[n]["perception"] + val[n]["vl_reasoning"],
                                      -scored.index(n)))


def ta_choice(seed_summary):
    """Task Arithmetic's lambda chosen on the held-out split among the grid points scored there
    (rows.TA_CHOICES; all fifteen in summaries made before the fourth recipe): the label-free bar
    of the table."""
    return choose(seed_summary, [f"TA {lam}" for lam in rows.LAMBDAS])


def dual_choice(seed_summary, start):
    """The dual row of one start ("" or "open ") chosen on the held-out split, beta, alpha and lam
    together."""
    return choose(seed_summary, [name for name in seed_summary["val"] if name.startswith("dual ")
                                 and name.startswith("dual open ") == (start == "open ")])


# ---- over the seeds ------------------------------------------------------------------------

CHOSEN = {"TA (chosen on the held-out split)": ta_choice,
          "dual (chosen on the held-out split)": lambda s: dual_choice(s, ""),
          "dual open (chosen on the held-out split)": lambda s: dual_choice(s, "open ")}


def outcomes(seeds, name, axis):
    """Per seed, the per-item outcomes of a row (or of a chosen row: a name of CHOSEN), or None
    where a seed lacks it."""
    out = []
    for s in seeds:
        row = CHOSEN[name](s) if name in CHOSEN else name
        if row is None or row not in s["items"]:
            return None
        out.append(s["items"][row][axis] if axis in AXES else s["logp"][row]["vl_reasoning"])
    return out


def table(seeds):
    """{row: {axis: figure with interval}} for every row every seed has, and the chosen rows;
    the continuous metric as vl_reasoning_logp (mean log-likelihood per token of the chain)."""
    names = [n for n in seeds[0]["items"] if all(n in s["items"] for s in seeds)] + list(CHOSEN)
    out = {}
    for name in names:
        figures = {}
        for axis in AXES:
            worlds = outcomes(seeds, name, axis)
            if worlds is not None:
                figures[axis] = stats.figure(worlds)
        logp = outcomes(seeds, name, "logp")
        if logp is not None:
            figures["vl_reasoning_logp"] = stats.figure(logp, scale=1.0)
        if figures:
            out[name] = figures
    return out


def compare(seeds, a, b, axis, fraction=1.0):
    """Row a minus row b (or fraction x b) on one axis, paired item by item in every seed."""
    wa, wb = outcomes(seeds, a, axis), outcomes(seeds, b, axis)
    if wa is None or wb is None:
        return None
    scale = 1.0 if axis == "logp" else 100.0
    return stats.margin(wa, wb, fraction, scale) if fraction != 1.0 else \
        stats.paired(wa, wb, scale)


def references(seeds, names):
    """Every row of `names` (the table's) against Task Arithmetic at its chosen lambda (both
    axes), the VLM (perception) and, for a trained row, its untrained start (both axes)."""
    out = {}
    ta = "TA (chosen on the held-out split)"
    for name in names:
        out[name] = {"vs_ta": {axis: compare(seeds, name, ta, axis) for axis in AXES},
                     "vs_vlm": {"perception": compare(seeds, name, "VLM", "perception")}}
        control = rows.controls().get(name)
        if control:
            out[name]["vs_start"] = {axis: compare(seeds, name, control, axis) for axis in AXES}
            out[name]["start"] = control
    return out


def targets(seeds):
    """The label-free target against the oracle (open start, lam 1): VL reasoning at least TARGET
    of the oracle's, and perception no less than its (within NON_INFERIOR points), for each chosen
    dual row and Task Arithmetic at its chosen lambda; each part met, not met or undecided by its
    paired interval; and each against Task Arithmetic at its chosen lambda."""
    out = {}
    for name in CHOSEN:
        reasoning = compare(seeds, name, "oracle open lam=1.0", "vl_reasoning", TARGET)
        perception = compare(seeds, name, "oracle open lam=1.0", "perception")
        if reasoning is None or perception is None:
            continue
        out[name] = {
            "reasoning": dict(reasoning, met=met(reasoning["low"], reasoning["high"], 0.0)),
            "perception": dict(perception, met=met(perception["low"], perception["high"],
                                                   -NON_INFERIOR))}
        out[name]["met"] = combined(out[name]["reasoning"]["met"], out[name]["perception"]["met"])
    return out


def met(low, high, bound):
    """A target read from the interval of a paired difference that must lie above `bound`."""
    return "met" if low > bound else "not met" if high < bound else "undecided"


def combined(*parts):
    return "not met" if "not met" in parts else "met" if all(p == "met" for p in parts) else \
        "undecided"


def power(seeds):
    """N, the world x method interaction's standard deviation of VL reasoning measured on Task
    Arithmetic's grid, and the smallest paired difference the table detects at 80 % power."""
    if len(seeds) < 2 or not all(len(ta_grid(s)) == len(rows.LAMBDAS) for s in seeds):
        return None
    grid = {lam: [s["rows"][f"TA {lam}"]["vl_reasoning"] for s in seeds] for lam in rows.LAMBDAS}
    sigma = stats.interaction_sd(grid)
    return {"worlds": len(seeds), "interaction_sd": sigma,
            "detectable_at_80": stats.detectable(sigma, len(seeds))}


def scan_against_lambda(seeds):
    """The lambda scan's label-free KL against Task Arithmetic's perception over the grid, per
    seed and pooled over seeds, beside what lambda alone gives (its rank correlation with the
    same perception): the scan adds information only where it ranks better than lambda."""
    per_seed, kls, lams, perceptions = [], [], [], []
    for s in seeds:
        grid = [(lam, name) for lam, name in ta_grid(s) if name in s["scan_kl"]]
        if len(grid) < 2:  # --only on a world whose Task Arithmetic rows were never made
            return None
        names = [name for _, name in grid]
        kl = [s["scan_kl"][n] for n in names]
        lam = [lam for lam, _ in grid]
        perception = [s["rows"][n]["perception"] for n in names]
        per_seed.append({"scan": stats.spearman(kl, perception),
                         "lambda": stats.spearman(lam, perception)})
        kls += kl
        lams += lam
        perceptions += perception
    return {"per_seed": per_seed, "pooled": {"scan": stats.spearman(kls, perceptions),
                                             "lambda": stats.spearman(lams, perceptions)}}


def rule_pick(kl):
    """The lambda rule the README gave until it was measured, read from a scan ({"TA lam": KL}):
    the KL "rises steeply" at the first lambda whose rise (KL minus the previous lambda's) is at
    least twice the rise before it; the rule picks lam = twice the lambda before that (twice the
    largest lambda scanned if the KL never rises so). Returns (steep lambda or None, the pick)."""
    points = sorted((float(name.split()[1]), value) for name, value in kl.items())
    rises = [b[1] - a[1] for a, b in zip(points, points[1:])]
    for i in range(1, len(rises)):
        if rises[i] >= 2 * rises[i - 1]:
            return points[i + 1][0], 2 * points[i][0]
    return None, 2 * points[-1][0]


def lambda_rule(seeds):
    """Per seed: where the scan's KL rises steeply, FRISM's best lam over LAM_GRID (alpha 0.1, the
    paper's start; ties: more perception) and whether it lies between the steep lambda and three
    times it; and the chance that a lam drawn at random from the grid would lie there in every
    seed (the share of the grid the range covers, multiplied over seeds)."""
    out, chance = [], 1.0
    for s in seeds:
        steep, pick = rule_pick(s["scan_kl"])
        grid = {lam: s["rows"].get(f"FRISM alpha=0.1 lam={lam}") for lam in rows.LAM_GRID}
        if steep is None or not all(grid.values()):
            out.append({"steep_at": steep, "pick": pick})
            continue
        best = max(rows.LAM_GRID, key=lambda lam: (grid[lam]["vl_reasoning"],
                                                   grid[lam]["perception"]))
        inside = [lam for lam in rows.LAM_GRID if steep <= lam <= 3 * steep]
        chance *= len(inside) / len(rows.LAM_GRID)
        out.append({"steep_at": steep, "pick": pick, "best": best,
                    "in_range": steep <= best <= 3 * steep, "grid": {str(k): v for k, v in
                                                                      grid.items()}})
    return {"per_seed": out, "chance_all_in_range": chance if all("best" in r for r in out)
            else None}


def summarize(seeds):
    """Everything the tables, the plots, the README and docs/miniature.md state, from the
    per-seed summaries (toy.one_seed)."""
    checks, figures = [world_check(s) for s in seeds], table(seeds)
    return {"worlds": len(seeds), "world_checks": checks,
            "world_check_passes": sum(c["passes"] for c in checks),
            "table": figures, "references": references(seeds, figures),
            "chosen": {name: [choose_name(s) for s in seeds] for name, choose_name in
                       CHOSEN.items()},
            "targets": targets(seeds), "power": power(seeds),
            "scan": scan_against_lambda(seeds), "lambda_rule": lambda_rule(seeds),
            "depths": depths(seeds), "logp_against_accuracy": logp_against_accuracy(seeds)}
