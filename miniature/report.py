"""What toy.py prints: the world check per seed (the LRM by depth, the VLM, Task Arithmetic's
curve and whether it is graded), one table of every row with its 95 % intervals and its paired
difference to Task Arithmetic at its chosen lambda, VL reasoning by depth, the choices made on the
held-out split and the targets, the scan, the lambda rule, the second-order reading, the table's
power, and where the time went. Uses rows, findings and stats."""
import re

from miniature import findings, rows


def cell(figure, digits=1):
    """A figure with its interval, "86.3 [80.1, 92.5]"; "-" where there is none."""
    if figure is None:
        return "-"
    if figure["low"] == figure["high"]:
        return f"{figure['mean']:.{digits}f}"
    return f"{figure['mean']:.{digits}f} [{figure['low']:.{digits}f}, {figure['high']:.{digits}f}]"


def difference(figure):
    """A paired difference with its interval and verdict, "+4.3 [2.1, 6.5] above"."""
    if figure is None:
        return "-"
    return (f"{figure['mean']:+.1f} [{figure['low']:+.1f}, {figure['high']:+.1f}] "
            f"{figure['verdict']}")


def print_world_checks(summary):
    print(f"\nWorld check, per seed (the LRM on problems it never trained on, by depth; the VLM's "
          f"perception, band {findings.PERCEPTION_BAND[0]:.0f}-{findings.PERCEPTION_BAND[1]:.0f}"
          f"; Task Arithmetic's curve over lambda, perception / VL reasoning)")
    for s, check in zip(summary["per_seed"], summary["findings"]["world_checks"]):
        lrm = "; ".join(f"{form.split('_')[0]} " + " / ".join(f"{v:.0f}" for v in depth.values())
                        for form, depth in check["lrm_by_depth"].items())
        ta, failing = check["ta_graded"], [k for k, v in check["holds"].items() if not v]
        print(f"  seed {s['seed']}: {s['meta']['vl_reasoning'].get('problems')} distinct VL "
              f"problems; LRM by depth {lrm}; VLM {check['vlm_perception']:.1f}; ideal "
              f"composition {s['world_check']['ideal']['perception']:.1f} / "
              f"{s['world_check']['ideal']['vl_reasoning']:.1f}; "
              f"{'FAILS: ' + ', '.join(failing) if failing else 'passes'}")
        print("    TA " + ", ".join(f"{lam}: {p:.0f}/{r:.0f}" for lam, p, r in check["ta_curve"]))
        if ta:
            print(f"    graded: peak {ta['peak']:.1f} at lambda {ta['peak_lambda']}, "
                  f"{ta['points_at_half_peak']} points at half the peak or more, largest step up "
                  f"{100 * (ta['largest_step_share'] or 0):.0f} % of the peak, perception down "
                  f"{ta['perception_drop']:.0f} (largest rise {ta['perception_largest_rise']:.1f}"
                  f"): " + ", ".join(f"{k} {'holds' if v else 'FAILS'}"
                                     for k, v in ta["holds"].items()))
    print(f"  {summary['findings']['world_check_passes']} of {len(summary['per_seed'])} seed(s) "
          f"pass the world check.")


def print_table(summary):
    table, refs = summary["findings"]["table"], summary["findings"]["references"]
    over = "worlds" if summary["seeds"] > 1 else "the items of one world"
    print(f"\nEvery row ({summary['seeds']} seed(s)): mean [95 % interval over {over}]; the "
          f"paired difference to Task Arithmetic at its lambda chosen on the held-out split")
    width = max(len(n) for n in table) + 2
    print(f"{'row':{width}s}{'perception':>22s}{'VL reasoning':>22s}{'chain log-lik':>22s}"
          f"{'VL vs TA (chosen)':>30s}{'perception vs TA':>30s}")
    for name, figures in table.items():
        vs = refs[name]["vs_ta"]
        print(f"{name:{width}s}{cell(figures.get('perception')):>22s}"
              f"{cell(figures.get('vl_reasoning')):>22s}"
              f"{cell(figures.get('vl_reasoning_logp'), 2):>22s}"
              f"{difference(vs['vl_reasoning']):>30s}{difference(vs['perception']):>30s}")


def print_depths(summary):
    f = summary["findings"]
    print("\nVL reasoning by depth (accuracy %, and the chain's log-likelihood per token; mean "
          "over seeds)")
    for name, row in f["depths"].items():
        print(f"  {name:40s}" + "".join(f"  depth {d}: {row['accuracy'][d]:5.1f} "
                                        f"({row['logp'][d]:6.2f})" for d in row["accuracy"]))
    agree = f["logp_against_accuracy"]
    if agree:
        print("The chain's log-likelihood against accuracy over Task Arithmetic's grid, rank "
              "correlation per seed: " + ", ".join(f"{r:.2f}" for r in agree["per_seed"]) +
              f"; pooled {agree['pooled']:.2f}")


def print_choices(summary):
    f = summary["findings"]
    for name, picks in f["chosen"].items():
        if all(picks):
            print(f"\n{name}, per seed: {'; '.join(picks)}")
    for name, target in f["targets"].items():
        print(f"  target against the oracle (open start, lam 1), {name}: VL reasoning at least "
              f"{100 * findings.TARGET:.0f} % of its: {difference(target['reasoning'])} -> "
              f"{target['reasoning']['met']}; perception no less: "
              f"{difference(target['perception'])} -> {target['perception']['met']}; "
              f"{target['met']}")


def print_power(summary):
    p = summary["findings"]["power"]
    if p:
        print(f"\nPower: {p['worlds']} worlds; the world x lambda interaction of Task Arithmetic's "
              f"VL reasoning has a standard deviation of {p['interaction_sd']:.1f} points; a "
              f"paired difference of {p['detectable_at_80']:.1f} points is detected at 80 % "
              f"power.")


def print_scan(summary):
    scan = summary["findings"]["scan"]
    if scan is None:
        return
    print("\nLambda scan: rank correlation with Task Arithmetic's perception over its grid, the "
          "scan's KL / lambda alone, per seed: " + ", ".join(
              f"{r['scan']:.2f} / {r['lambda']:.2f}" for r in scan["per_seed"]) +
          f"; pooled over seeds {scan['pooled']['scan']:.2f} / {scan['pooled']['lambda']:.2f}")
    rule = summary["findings"]["lambda_rule"]
    if rule["chance_all_in_range"] is not None:
        print("Choosing lam: FRISM's best lam over the grid (alpha 0.1) against the scan's steep "
              "lambda, per seed: " + ", ".join(
                  f"best {r['best']} / steep {r['steep_at']} "
                  f"({'inside' if r['in_range'] else 'outside'} steep-3x)" for r in
                  rule["per_seed"]) +
              f"; chance alone puts it inside in every seed with probability "
              f"{rule['chance_all_in_range']:.2f}")


def print_reading(summary):
    """Per seed: the second-order reading against Eq. 10's first step and the learned gates, each
    agreement beside its chance level."""
    for s in summary["per_seed"]:
        r = s.get("reading")
        if not r:
            continue
        exact = r["exact"]
        ratios = sorted(h / e for h, e in zip(exact["h"], exact["hessian"]) if e > 0)
        print(f"\nThe second-order reading, seed {s['seed']} (lam {r['lam']}, every gate at "
              f"{r['start']:.2f}; {r['directions']} directions; median relative standard error "
              f"{r['relative_se']:.2f}; against the exact Hessian on {len(exact['h'])} directions, "
              f"median ratio {ratios[len(ratios) // 2] if ratios else float('nan'):.2f})")
        for alpha, a in r["alphas"].items():
            print(f"  alpha {alpha}: predicted open {100 * a['predicted_open']:.1f} % of the "
                  f"directions ({100 * a['predicted_open_energy']:.1f} % of the energy); Eq. 10's "
                  f"exact first step agrees on {100 * a['first_step_agrees']:.1f} %")
        for name, row in r.get("rows", {}).items():
            agrees = (f"; agrees with the prediction on {100 * row['agrees']:.1f} % (chance "
                      f"{100 * row['chance']:.1f} %, kappa {row['kappa']:.2f})"
                      if "agrees" in row else "")
            print(f"  {name:34s} opened {100 * row['opened']:5.1f} % "
                  f"({100 * row['opened_energy']:.1f} % of the energy){agrees}")


def print_times(seeds):
    """Where the time went, per seed: each stage of the world (when it was built), the lambda
    scan, each merge (grouped by kind), each scoring."""
    for s in seeds:
        groups = {}
        for name, seconds in s["seconds"].items():
            key = re.sub(r" [\d.=-]+|[=-][\d.]+", "", name) if name.startswith(
                ("merge ", "scoring ", "of it, ")) else name
            count, total = groups.get(key, (0, 0.0))
            groups[key] = (count + 1, total + seconds)
        print(f"\nTime, seed {s['seed']} ({sum(s['seconds'].values()):.0f} s in all)")
        for key, (count, total) in groups.items():
            print(f"  {key:55s} {total:7.1f} s" + (f"  ({count} runs)" if count > 1 else ""))


def print_all(summary, only):
    print_world_checks(summary)
    print_table(summary)
    if only:
        print(f"(--only: {len(rows.selected(only, True))} row(s) made now; every other row is "
              f"the one cached)")
    print_depths(summary)
    print_choices(summary)
    print_power(summary)
    print_scan(summary)
    print_reading(summary)
    print_times(summary["per_seed"])


# ---- the words the README and docs/miniature.md use, from the summary (test_docs checks them) --

def claim(summary, a, b, axis):
    """Row a against row b on one axis, paired over every world and item: "+4.3 points [+2.1,
    +6.5], above"; the word is the one the interval allows."""
    d = findings.compare(summary["per_seed"], a, b, axis)
    unit = "" if axis == "logp" else " points"
    return f"{d['mean']:+.1f}{unit} [{d['low']:+.1f}, {d['high']:+.1f}], {d['verdict']}"


def target_words(summary, row):
    """What the label-free target's intervals say of a row: "the target is met" (not met,
    undecided)."""
    return f"the target is {summary['findings']['targets'][row]['met']}"


def check_words(summary):
    """How many reported worlds pass the world check: "5 of 5 worlds pass"."""
    return f"{summary['findings']['world_check_passes']} of {summary['seeds']} worlds pass"


def figure_words(summary, name):
    """A figure the docs quote, as the summary has it (<!-- figure: NAME -->): "power", the
    smallest paired difference detected at 80 % power; "scan", the scan's rank correlation with
    Task Arithmetic's perception per world beside lambda's; "pooled", the same pooled over worlds;
    "rule", the chance that a random lam lies in the lambda rule's range in every world."""
    found = summary["findings"]
    if name == "power":
        return f"a paired difference of {found['power']['detectable_at_80']:.1f} points"
    if name == "scan":
        per_seed = found["scan"]["per_seed"]
        if all(f"{x['scan']:.2f}" == f"{x['lambda']:.2f}" for x in per_seed):
            return ", ".join(f"{x['scan']:.2f}" for x in per_seed) + " for both"
        return ", ".join(f"{x['scan']:.2f} / {x['lambda']:.2f}" for x in per_seed)
    if name == "pooled":
        pooled = found["scan"]["pooled"]
        return f"{pooled['scan']:.2f} against lambda's {pooled['lambda']:.2f}"
    if name == "rule":
        return f"probability {found['lambda_rule']['chance_all_in_range']:.2f}"
    raise ValueError(name)
