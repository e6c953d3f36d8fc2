"""The miniature's table of methods: MINIATURE, one Line a method at one setting over the grid of
one knob, each row made by baselines.py or frism.py on one seed's world (a Seed). A new method is
one Line here, and its expectation in test_toy.py. Uses world and benchmarks (the oracle's
labelled chains)."""
import functools
from typing import Callable, NamedTuple, Optional

from miniature import benchmarks

# Every grid is fixed here, before any score of a reported seed was seen, and is the same for
# every seed. Task Arithmetic's lambda: 1/32 apart where its VL reasoning rises (between about
# 0.72 and 0.94 in the development seeds, where it climbs some 80 points in 0.1 of lambda), 1/16
# to 1/8 around its peak, coarser beyond.
LAMBDAS = (0.5, 0.71875, 0.75, 0.78125, 0.8125, 0.84375, 0.875, 0.90625, 0.9375, 1.0, 1.0625,
           1.125, 1.25, 1.5, 2.0)
# Its lambda is chosen on the held-out split among every 1/8 from 0.75 to 1.25 (ours: its peak lay
# at 0.94-1.06 in every development seed); the points between draw its curve, the check grades it.
TA_CHOICES = (0.75, 0.875, 1.0, 1.125, 1.25)
BASELINE_LAMBDAS = (0.5, 1.0, 1.5, 2.0)  # selective, STAR and TSV's alpha
THRESHOLDS = (0.1, 0.2, 0.3, 0.4)  # IP-Merging's T, at lam 1
# FRISM over alpha (as TA over lambda) and over its own lam: its gates start at sigmoid(0) = 0.5,
# i.e. at Task Arithmetic lam / 2, and can reach lam.
FRISM_LAMS = (1.0, 2.0)
ALPHAS = (0.1, 1.0)
# Where the gates start: the paper's g = 0, and open (sigmoid(4) = 0.98, near TA at lam).
STARTS = {"": 0.0, "open ": 4.0}
# FRISM at the default alpha over a lam grid that holds twice every lambda of the scan's grid:
# what the lambda rule (README) is measured against.
LAM_GRID = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
STEPS = 150
FRISM_SETTINGS = ["--steps", str(STEPS), "--batch-size", "8", "--max-new-tokens", "16"]
ORACLE_CHAINS = 256  # labelled VL-reasoning chains on fresh images, for the oracle only
# The dual objective (ours) over beta, the text stream's weight, from each start at FRISM's
# (lam, alpha) and at alpha 0, to which the second-order reading pointed (Eq. 9's reward outweighs
# Eq. 8's curvature in nearly every direction; the oracle has no Eq. 9); the LRM's answers are its
# whole chain.
BETAS = (0.3, 1.0, 3.0)
DUAL_SETTINGS = ["--text-max-new-tokens", "64"]
DUAL_SETTINGS_GRID = {(1.0, 0.1): BETAS, (1.0, 0.0): (1.0,)}
RANKS = (1, 4, 16, 64)  # truncated Task Arithmetic at lambda 1: the top k directions
BANDS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 128))  # injected alone, at each TA lambda
BAND_LAMBDAS = (0.5, 1.0, 1.5, 2.0)


def row_dir(name):
    """A row's directory (and record) name under runs/."""
    return name.replace(" ", "_").replace("=", "-")


def sigmoid(x):
    import math
    return 1 / (1 + math.exp(-x))


class Seed:
    """What a row needs to be made in one seed's world: the three models, the calibration set,
    the text prompts. Each method returns (program, argv), --out still to come."""

    def __init__(self, world, data, seed, smoke):
        self.world, self.calib, self.text, self.seed, self.smoke = \
            world, data["calib"], data["text_prompts"], seed, smoke
        self.trio = ["--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base", f"{world}/base"]

    def baseline(self, method, *flags):
        import baselines
        return baselines.main, [method, *self.trio, *map(str, flags)]

    def frism(self, *flags):
        """frism.py without training (--no-train, --band, --rank): no calibration data."""
        import frism
        return frism.main, self.trio + list(map(str, flags))

    def train(self, *flags, make_objective=None):
        """frism.py's training, with the miniature's settings and calibration set."""
        import frism
        main = frism.main if make_objective is None else functools.partial(
            frism.main, make_objective=make_objective)
        return main, self.trio + FRISM_SETTINGS + [*map(str, flags), "--data", self.calib] + (
            ["--steps", "2"] if self.smoke else [])

    def dual(self, lam, alpha, beta, gate_init):
        """frism.py's training with the dual objective on the text prompts (ours)."""
        return self.train("--objective", "dual", "--text-data", self.text, "--lam", lam,
                          "--alpha", alpha, "--beta", beta, "--gate-init", gate_init,
                          *DUAL_SETTINGS)


def oracle(n, seed):
    """The ceiling of subspace gating here (ours): the same gates, trained on FRISM's KL plus the
    cross-entropy of n labelled VL-reasoning chains, labels FRISM does not have. A second data
    stream, so it is made by a factory: frism.main(argv, make_objective=oracle(...))."""
    import torch.nn.functional as F
    import frism

    def make_objective(model, processor, gated, answers, args):
        chains = benchmarks.reasoning_chains(processor, n, seed)
        data = frism.batches(len(chains), 8, seed)

        def objective(step):
            kl = frism.distill_loss(step.student_logp, step.teacher_logp)  # Eq. 8
            batch, mask = frism.make_batch(processor, [chains[i] for i in next(data)],
                                           model.device)
            targets = batch["input_ids"].roll(-1, dims=1)[mask]  # the token each position predicts
            ce = F.cross_entropy(frism.answer_logits(model, batch, mask), targets)
            return {"loss": kl + ce, "kl": kl, "chain_ce": ce}
        return objective
    return make_objective


class Line(NamedTuple):
    """One method at one setting over a grid of one knob: a row of the table per grid point, a
    line (or a point) on the plots."""
    label: str  # the legend, and a name for --only
    row: str  # each row's name, "{}" standing for its grid value
    grid: tuple  # the knob's values, in order ((None,): one row)
    make: Optional[Callable]  # (value, Seed) -> (program, argv); None: the VLM itself, no merge
    full: bool = False  # only with --full
    plots: tuple = ("tradeoff",)  # "tradeoff", "ta", "bands", "ranks", "lam" (the bands and lam
    # plots draw Task Arithmetic beside their own lines; the gate picture draws GATE_ROWS)
    style: str = "o-"  # matplotlib format on the trade-off plot
    colour: str = "tab:blue"
    knob: str = ""  # each point annotated "knob=value" on the trade-off plot
    validate: tuple = ()  # the grid values also scored on the held-out split, among which its
    # setting is chosen

    def rows(self):
        return {self.row.format(value): value for value in self.grid}


def control(start, lam):
    """The control of a trained row: Task Arithmetic at its start's effective lambda, lam *
    sigmoid(gate start), untrained: what training adds is the row minus its control."""
    return round(lam * sigmoid(STARTS[start]), 4)


# The miniature: one line a method. A new method is one Line here (and its expectation in the
# toy test); the run, the tables, the plots, --only and the test all read this table.
MINIATURE = [
    Line("VLM alone", "VLM", (None,), None, style="s", colour="gray"),
    Line("Task Arithmetic", "TA {}", LAMBDAS, lambda lam, s: s.baseline("ta", "--lam", lam),
         plots=("tradeoff", "ta"), knob="λ", validate=TA_CHOICES),
    Line("TIES-Merging", "TIES", (None,), lambda _, s: s.baseline("ties"), full=True, style="D",
         colour="tab:purple"),
    Line("DARE", "DARE", (None,), lambda _, s: s.baseline("dare"), full=True, style="v",
         colour="tab:brown"),
    Line("IP-Merging", "IP T={}", THRESHOLDS, lambda t, s: s.baseline("ip", "--threshold", t),
         full=True, style="^-", colour="tab:green", knob="T"),
    *[Line(f"FRISM{', open start' if start else ''}, lam {lam}",
           f"FRISM {start}lam={lam} alpha={{}}", ALPHAS,
           lambda alpha, s, lam=lam, g0=g0: s.train("--lam", lam, "--alpha", alpha,
                                                    "--gate-init", g0),
           full=bool(start) or lam != FRISM_LAMS[0], plots=("tradeoff",),
           style="P:" if start else "*-", colour=colour, knob="α")
      for start, g0 in STARTS.items()
      for lam, colour in zip(FRISM_LAMS, ("darkred", "darkorange") if start else
                             ("tab:red", "tab:orange"))],
    # Controls: each start's untrained merge, Task Arithmetic at lam * sigmoid(g0) (the paper's
    # start at lam 1 and 2 is TA 0.5 and 1.0, rows of the Task Arithmetic line)
    Line("untrained open start", "start open lam={}", FRISM_LAMS,
         lambda lam, s: s.frism("--no-train", "--lam", control("open ", lam)), full=True,
         style="+", colour="darkred", knob="lam"),
    *[Line(f"entropy objective{', open start' if start else ''}, lam {lam}",
           f"entropy {start}lam={lam} alpha={{}}", ALPHAS,
           lambda alpha, s, lam=lam, g0=g0: s.train("--objective", "entropy", "--lam", lam,
                                                    "--alpha", alpha, "--gate-init", g0),
           full=True, plots=("tradeoff",), style="X:" if start else "X-",
           colour=colour, knob="α")
      for start, g0 in STARTS.items()
      for lam, colour in zip(FRISM_LAMS[:1], ("indigo",) if start else ("tab:cyan",))],
    Line("selective (λ grid)", "selective {}", BASELINE_LAMBDAS,
         lambda lam, s: s.baseline("selective", "--lam", lam), full=True, style="x--",
         colour="tab:olive"),
    Line("STAR (λ grid)", "STAR {}", BASELINE_LAMBDAS,
         lambda lam, s: s.baseline("star", "--lam", lam), full=True, style="x--",
         colour="lightseagreen"),
    Line("TSV (α grid)", "TSV {}", BASELINE_LAMBDAS,
         lambda alpha, s: s.baseline("tsv", "--alpha", alpha), full=True, style="x--",
         colour="tab:pink"),
    Line("oracle: the same gates trained WITH labels, open start", "oracle open lam={}",
         FRISM_LAMS[:1], lambda lam, s: s.train("--lam", lam, "--gate-init", STARTS["open "],
                                                make_objective=oracle(8 if s.smoke else
                                                                      ORACLE_CHAINS, s.seed)),
         full=True, plots=("tradeoff",), style="*", colour="black", knob="lam"),
    Line("oracle, the paper's start", "oracle lam={}", FRISM_LAMS[:1],
         lambda lam, s: s.train("--lam", lam, "--gate-init", STARTS[""], make_objective=oracle(
             8 if s.smoke else ORACLE_CHAINS, s.seed)),
         full=True, plots=("tradeoff",), style="*", colour="dimgray", knob="lam"),
    *[Line(f"dual objective{', open start' if start else ''}, lam {lam}, alpha {alpha}",
           f"dual {start}lam={lam} alpha={alpha} beta={{}}", betas,
           lambda beta, s, lam=lam, alpha=alpha, g0=g0: s.dual(lam, alpha, beta, g0),
           full=True, plots=("tradeoff",), style="h:" if start else "h-",
           colour=colour, knob="β", validate=betas)
      for start, g0 in STARTS.items()
      for ((lam, alpha), betas), colour in zip(DUAL_SETTINGS_GRID.items(),
                                               ("forestgreen", "lime") if start else
                                               ("darkgreen", "springgreen"))],
    Line("truncated Task Arithmetic, lambda 1", "TA top-{}", RANKS,
         lambda k, s: s.frism("--no-train", "--rank", k, "--lam", 1.0), full=True,
         plots=("ranks",)),
    *[Line(f"directions {a}-{b}", f"band {a}-{b} lam={{}}", BAND_LAMBDAS,
           lambda lam, s, a=a, b=b: s.frism("--no-train", "--band", a, b, "--lam", lam),
           full=True, plots=("bands",), colour=colour)
      for (a, b), colour in zip(BANDS, ("#440154", "#3b528b", "#21918c", "#5ec962", "#b5a300"))],
    Line("FRISM, alpha 0.1, over lam", "FRISM alpha=0.1 lam={}", LAM_GRID,
         lambda lam, s: s.train("--lam", lam, "--alpha", 0.1, "--gate-init", 0.0), full=True,
         plots=("lam",), colour="tab:red"),
]  # a new method: one Line above this one
TA = next(line for line in MINIATURE if line.row == "TA {}")  # what the bands and lam plots compare
SHOWN = "FRISM lam=2.0 alpha=0.1"  # the run whose every gate is drawn
# The rows whose mean gate per band the gate picture sets beside the oracle's (lam 1)
GATE_ROWS = ("FRISM lam=1.0 alpha=0.1", "FRISM open lam=1.0 alpha=1.0",
             "entropy open lam=1.0 alpha=1.0", "dual lam=1.0 alpha=0.1 beta=1.0",
             "dual open lam=1.0 alpha=0.1 beta=1.0", "oracle lam=1.0", "oracle open lam=1.0")


def controls():
    """{trained row: its control}: every trained row at lam 1 or 2 (FRISM, the entropy and dual
    objectives, the oracle) against its start's untrained merge, Task Arithmetic at lam *
    sigmoid(g0): for the paper's start, rows of the Task Arithmetic line; for the open start, the
    rows of "untrained open start"."""
    out = {}
    for name in (name for line in MINIATURE for name in line.rows()):
        words = name.split()
        if words[0] not in ("FRISM", "entropy", "dual", "oracle"):
            continue
        lam = float(next(w for w in words if w.startswith("lam=")).split("=")[1])
        if lam in FRISM_LAMS:
            out[name] = f"start open lam={lam}" if "open" in words else f"TA {lam / 2}"
    return out


def selected(only, full):
    """{row name: (its Line, its grid value)}: every row of the table, or those --only names
    (a Line's label, a row's name, or a pattern of row names such as 'entropy*')."""
    import fnmatch
    rows = {name: (line, value) for line in MINIATURE for name, value in line.rows().items()}
    if only is None:
        return {name: row for name, row in rows.items() if full or not row[0].full}
    chosen = {}
    for pattern in only:
        names = [name for name, (line, _) in rows.items()
                 if line.label == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not names:
            lines = "; ".join(f"{line.label}: {line.row.format('*')}" for line in MINIATURE)
            raise SystemExit(f"toy.py: --only {pattern!r} names no row of the miniature, whose "
                             f"lines are (label: rows) {lines}.")
        chosen.update({name: rows[name] for name in names})
    return chosen
