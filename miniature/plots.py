"""The miniature's plots: the paper's Fig. 2 in miniature (every method, reasoning against
perception), Task Arithmetic over lambda by depth, bands of singular directions (its Fig. 3 in
miniature), FRISM against its lam, the gates, and the second-order reading direction by direction.
Every error bar is the 95 % interval of findings.table. Uses rows and reading."""
import json
import os

import torch

from miniature import findings, reading, rows

MERGED_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lines_in(table, figure):
    """The lines of MINIATURE that `figure` draws and that have every row in the table."""
    return [line for line in rows.MINIATURE if figure in line.plots
            and all(name in table for name in line.rows())]


def plot(summary, seeds, out_dir):
    """Every plot the summary holds the rows of; returns their paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots.")
        return []
    table = summary["findings"]["table"]
    paths = [tradeoff_plot(plt, table, summary, len(seeds), out_dir)]
    if lines_in(table, "ta"):
        paths.append(ta_plot(plt, summary, seeds, out_dir))
    if lines_in(table, "bands"):
        paths.append(bands_plot(plt, table, len(seeds), out_dir))
    if lines_in(table, "lam"):
        paths.append(lam_plot(plt, table, seeds, out_dir))
    if rows.SHOWN in seeds[0]["models"]:
        paths.append(gates_plot(plt, seeds, out_dir))
    if seeds[0].get("reading_record"):
        paths.append(curvature_plot(plt, seeds[0], out_dir))
    return paths


def saved(plt, fig, path, dpi):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def errorbars(ax, table, names, style, color, label, labels=None, x="perception",
              y="vl_reasoning"):
    """Each row's mean and 95 % interval; x or y may be the knob's values instead of an axis."""
    points = [table[n] for n in names]

    def values(c):
        return [p[c]["mean"] for p in points] if isinstance(c, str) else list(c)

    def err(c):
        return None if not isinstance(c, str) else [[p[c]["mean"] - p[c]["low"] for p in points],
                                                    [p[c]["high"] - p[c]["mean"] for p in points]]
    xs, ys = values(x), values(y)
    ax.errorbar(xs, ys, xerr=err(x), yerr=err(y), fmt=style, color=color, label=label,
                capsize=2, markersize=7)
    for xi, yi, text in zip(xs, ys, labels or []):
        ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6,
                    color=color)


def tradeoff_plot(plt, table, summary, seeds, out_dir):
    fig, ax = plt.subplots(figsize=(8, 6))
    for line in lines_in(table, "tradeoff"):
        line_rows = line.rows()
        errorbars(ax, table, list(line_rows), line.style, line.colour, line.label,
                  [f"{line.knob}={value}" for value in line_rows.values()] if line.knob else None)
    ideal = [s["world_check"]["ideal"]["vl_reasoning"] for s in summary["per_seed"]]
    ax.axhline(sum(ideal) / len(ideal), color="gray", ls=":", lw=1, label="ideal composition")
    ax.set_xlabel("toy perception accuracy (%)")
    ax.set_ylabel("toy VL reasoning accuracy (%)")
    ax.set_title(f"Reasoning against perception (toy world, {seeds} seed(s); 95 % intervals)")
    ax.legend(fontsize=6, loc="best")
    return saved(plt, fig, os.path.join(out_dir, "tradeoff.png"), 120)


def ta_plot(plt, summary, seeds, out_dir):
    """Task Arithmetic over lambda in every seed: perception and VL reasoning, and VL reasoning at
    each depth (the mean over seeds)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for s, check in zip(seeds, summary["findings"]["world_checks"]):
        lams, perception, reasoning = zip(*check["ta_curve"])
        left.plot(lams, perception, "s--", color="tab:blue", lw=1, markersize=3, alpha=0.6)
        left.plot(lams, reasoning, "o-", color="tab:red", lw=1, markersize=3, alpha=0.6)
    left.plot([], [], "s--", color="tab:blue", label="perception")
    left.plot([], [], "o-", color="tab:red", label="VL reasoning")
    left.set_xlabel("lambda")
    left.set_ylabel("toy accuracy (%)")
    left.set_title(f"Task Arithmetic, each of {len(seeds)} seed(s)")
    left.legend(fontsize=7)
    by_depth = [summary["findings"]["depths"][f"TA {lam}"]["accuracy"] for lam in rows.LAMBDAS]
    for depth, colour in zip(by_depth[0], ("tab:green", "tab:orange", "tab:purple", "tab:brown")):
        right.plot(rows.LAMBDAS, [row[depth] for row in by_depth], "o-", color=colour,
                   label=f"depth {depth}")
    right.set_xlabel("lambda")
    right.set_ylabel("toy VL reasoning accuracy (%)")
    right.set_title("Task Arithmetic's VL reasoning by depth (mean over seeds)")
    right.legend(fontsize=7)
    return saved(plt, fig, os.path.join(out_dir, "ta.png"), 110)


def bands_plot(plt, table, seeds, out_dir):
    """Each band of singular directions injected alone in every layer, against lambda, beside
    Task Arithmetic; and truncated Task Arithmetic against k."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    for ax, column in zip(axes, ("perception", "vl_reasoning")):
        for line in lines_in(table, "bands"):
            errorbars(ax, table, list(line.rows()), "o-", line.colour, line.label,
                      x=line.grid, y=column)
        errorbars(ax, table, list(rows.TA.rows()), "o--", "black", "all (TA)", x=rows.TA.grid,
                  y=column)
        ax.set_xlabel("lambda")
        ax.set_ylabel(f"toy {column.replace('_', ' ')} (%)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("perception, one band injected")
    axes[1].set_title("VL reasoning, one band injected")
    for line in lines_in(table, "ranks"):
        errorbars(axes[2], table, list(line.rows()), "o-", "tab:blue", "perception",
                  x=line.grid, y="perception")
        errorbars(axes[2], table, list(line.rows()), "s-", "tab:red", "VL reasoning",
                  x=line.grid, y="vl_reasoning")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("k (top-k directions of every layer), lambda 1")
    axes[2].set_title("truncated Task Arithmetic")
    if lines_in(table, "ranks"):
        axes[2].legend(fontsize=7)
    fig.suptitle(f"Which singular directions do what (toy world, {seeds} seed(s))")
    return saved(plt, fig, os.path.join(out_dir, "bands.png"), 110)


def lam_plot(plt, table, seeds, out_dir):
    """FRISM against its lam, beside Task Arithmetic against lambda, with the lambda where each
    seed's scan rises steeply."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, column in zip(axes, ("perception", "vl_reasoning")):
        for line in lines_in(table, "lam") + [rows.TA]:
            errorbars(ax, table, list(line.rows()), line.style, line.colour, line.label,
                      x=line.grid, y=column)
        for s in seeds:
            steep = findings.rule_pick(s["scan_kl"])[0]
            if steep:
                ax.axvline(steep, color="gray", ls=":", lw=1)
        ax.set_xlabel("lam (FRISM) or lambda (Task Arithmetic)")
        ax.set_ylabel(f"toy {column.replace('_', ' ')} (%)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("perception (dotted: each seed's steep rise of the scan's KL)")
    axes[1].set_title("VL reasoning")
    fig.suptitle(f"Choosing lam (toy world, {len(seeds)} seed(s))")
    return saved(plt, fig, os.path.join(out_dir, "lam.png"), 110)


def gates_plot(plt, seeds, out_dir):
    """Left: every gate of one FRISM run. Right: per band, the mean gate of every trained row of
    GATE_ROWS at lam 1, over the seeds."""
    gates = reading.saved_gates(seeds[0]["models"][rows.SHOWN])
    names = sorted(gates, key=lambda p: (int(p.split(".layers.")[1].split(".")[0]),
                                         MERGED_ORDER.index(p.rsplit(".", 1)[1])))
    grid = torch.full((len(names), max(len(g) for g in gates.values())), float("nan"))
    for row, path in enumerate(names):
        grid[row, :len(gates[path])] = gates[path]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    image = left.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                        interpolation="nearest")
    left.set_yticks(range(len(names)), [f"L{p.split('.layers.')[1].split('.')[0]} "
                                        f"{p.rsplit('.', 1)[1]}" for p in names], fontsize=6)
    left.set_xlabel("singular direction (descending S; k and v have fewer)")
    left.set_title(f"gate (S_eff / S), {rows.SHOWN}, seed {seeds[0]['seed']}")
    fig.colorbar(image, ax=left, fraction=0.03)
    drawn = [name for name in rows.GATE_ROWS if all(name in s["models"] for s in seeds)]
    width = 0.8 / max(len(drawn), 1)
    for i, row in enumerate(drawn):
        layers = [g for s in seeds for g in reading.saved_gates(s["models"][row]).values()]
        means = []
        for a, b in rows.BANDS:  # mean gate of the band's directions, over layers and seeds
            values = torch.cat([g[a - 1:b] for g in layers])
            means.append(values.mean().item() if len(values) else float("nan"))
        right.bar([k + i * width for k in range(len(rows.BANDS))], means, width, label=row)
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(rows.BANDS))],
                     [f"{a}-{b}" for a, b in rows.BANDS])
    right.set_xlabel("singular directions (band)")
    right.set_ylabel("mean gate (S_eff / S)")
    right.set_ylim(0, 1)
    right.set_title(f"mean gate per band, lam {rows.FRISM_LAMS[0]} ({len(seeds)} seed(s))")
    right.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return saved(plt, fig, os.path.join(out_dir, "gates.png"), 110)


def curvature_plot(plt, seed_summary, out_dir):
    """The second-order reading of one seed, direction by direction: the vision curvature h_i
    against the injection benefit 2 alpha S_i^2 / sum S^2 (alpha 0.1), each direction coloured by
    the gate a row learned from the same start; above the diagonal, the reading closes it (at
    alpha 1, above the dashed line)."""
    with open(seed_summary["reading_record"]) as f:
        record = json.load(f)["reading"]
    h = torch.tensor(record["per_direction"]["h"]).clamp_min(1e-12)
    benefit = 2 * 0.1 * torch.tensor(record["per_direction"]["share"]).clamp_min(1e-12)
    learned = record["per_direction"]["gates"]
    shown = [name for name in ("oracle lam=1.0", "FRISM lam=1.0 alpha=0.1") if name in learned]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(6.5 * max(len(shown), 1), 5.5),
                             squeeze=False)
    low, high = min(h.min(), benefit.min()).item(), max(h.max(), benefit.max()).item()
    for ax, name in zip(axes[0], shown or [None]):
        colour = learned[name] if name else None
        points = ax.scatter(benefit, h, c=colour, cmap="viridis", vmin=0, vmax=1, s=4)
        ax.plot([low, high], [low, high], color="black", lw=1, label="h = benefit (alpha 0.1)")
        ax.plot([low, high], [10 * low, 10 * high], color="black", lw=1, ls="--",
                label="h = benefit (alpha 1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("injection benefit 2 alpha S_i^2 / sum S^2, alpha 0.1")
        ax.set_ylabel("vision curvature h_i (Gauss-Newton, Eq. 8)")
        ax.set_title(f"coloured by {name}'s learned gate" if name else "no learned gates")
        ax.legend(fontsize=7, loc="upper left")
        if name:
            fig.colorbar(points, ax=ax, fraction=0.04, label="learned gate (start 0.5)")
    fig.suptitle(f"The second-order reading, seed {seed_summary['seed']}: above the line the "
                 f"paper's reading closes a direction")
    return saved(plt, fig, os.path.join(out_dir, "curvature.png"), 110)
