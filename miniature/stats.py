"""The statistics of the miniature's findings, in plain Python: intervals over worlds and items,
paired differences and the words a comparison may use, rank correlation, agreement beyond chance,
and the smallest difference a number of worlds can detect. Uses nothing else of the project.

Every figure of a row is a share of items, measured in each world on that world's own items. A
95 % interval over worlds and items is a t interval over the per-world figures, with N - 1 degrees
of freedom: each world's figure carries its items' sampling noise and its world's own luck, so
their spread over worlds holds both. (A bootstrap over 5 worlds alone would be too narrow: it
treats the 5 as the whole population; the t interval is an honest floor at that count.) Two rows
are compared paired: in each world, on the same items, the difference of their figures; then the
same t interval over those N differences. With one world there is no spread over worlds: the
interval is then over the items alone (a t interval over the per-item differences) and says so.
"""
import math

# Ours: two rows are "level" when the whole 95 % interval of their paired difference lies within
# this many points of zero; "above" or "below" when it excludes zero; otherwise "undecided".
LEVEL = 2.0


def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) +
                     b * math.log(1 - x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t with P(T <= t) = p, by bisection."""
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def sd(values):
    values = list(values)
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def interval(values, level=0.95):
    """(mean, low, high): the t interval of the mean of `values`, len(values) - 1 degrees of
    freedom; (mean, mean, mean) for a single value or values that do not vary."""
    values = list(values)
    m = mean(values)
    if len(values) < 2 or all(v == values[0] for v in values):
        return m, m, m
    half = t_quantile(0.5 + level / 2, len(values) - 1) * sd(values) / math.sqrt(len(values))
    return m, m - half, m + half


def outcomes(code):
    """Per-item outcomes, written compactly as a string of 0 and 1 (the summary keeps them so),
    as a list of numbers; a list of numbers (the continuous metric) as it is."""
    return [int(c) for c in code] if isinstance(code, str) else list(code)


def figure(worlds, scale=100.0):
    """A row's figure over the worlds, with its interval: `worlds` holds each world's per-item
    outcomes (see outcomes). Over the worlds' means where there are two or more, over the items of
    the one world otherwise. Returns {"mean", "low", "high", "worlds", "over"}."""
    per_world = [[scale * v for v in outcomes(w)] for w in worlds]
    values = [mean(w) for w in per_world] if len(per_world) > 1 else per_world[0]
    m, low, high = interval(values)
    return {"mean": m, "low": low, "high": high, "worlds": [mean(w) for w in per_world],
            "over": "worlds" if len(per_world) > 1 else "items"}


def paired(a, b, scale=100.0):
    """Row a minus row b, item by item within each world (the same items), with its interval:
    over the per-world differences of means where there are two or more worlds, over the items
    of the one world otherwise. `a` and `b`: per-world per-item outcomes."""
    diffs = [[scale * (x - y) for x, y in zip(outcomes(wa), outcomes(wb), strict=True)]
             for wa, wb in zip(a, b, strict=True)]
    values = [mean(d) for d in diffs] if len(diffs) > 1 else diffs[0]
    m, low, high = interval(values)
    return {"mean": m, "low": low, "high": high, "worlds": [mean(d) for d in diffs],
            "over": "worlds" if len(diffs) > 1 else "items", "verdict": verdict(low, high)}


def verdict(low, high, level=LEVEL):
    """The word a comparison may use, from the interval of a paired difference (a minus b)."""
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    if -level <= low and high <= level:
        return "level"
    return "undecided"


def margin(a, b, fraction=1.0, scale=100.0):
    """Paired interval of a - fraction * b over the worlds (or the one world's items): whether a
    reaches `fraction` of b, as a paired difference (e.g. 80 % of the oracle's reasoning)."""
    return paired(a, [[fraction * v for v in outcomes(w)] for w in b], scale)


def spearman(x, y):
    """Rank correlation of two equally long lists (ties get their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else 0.0


def kappa(a, b):
    """Cohen's kappa of two equally long lists of yes/no calls, and the agreement chance alone
    would give (from each list's own rate of yes): (agreement, chance, kappa)."""
    n = len(a)
    agree = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return agree, chance, (agree - chance) / (1 - chance) if chance < 1 else 0.0


def interaction_sd(table):
    """The world x method interaction's standard deviation of a two-way table {method: [value of
    each world]}: the residual of the additive fit (world effect + method effect), with
    (worlds - 1)(methods - 1) degrees of freedom. It is what varies from world to world in the
    difference between two methods, item noise included."""
    methods, worlds = list(table), len(next(iter(table.values())))
    grand = mean(v for row in table.values() for v in row)
    world = [mean(table[m][w] for m in methods) - grand for w in range(worlds)]
    method = {m: mean(table[m]) - grand for m in methods}
    residual = sum((table[m][w] - grand - world[w] - method[m]) ** 2
                   for m in methods for w in range(worlds))
    return math.sqrt(residual / ((worlds - 1) * (len(methods) - 1)))


def detectable(sigma_interaction, worlds, power=0.8, level=0.95):
    """The smallest paired difference between two rows that a two-sided t test at `level` over
    `worlds` worlds detects with `power`: (t_{level} + t_{power}) * sd(d) / sqrt(N), with sd(d) =
    sqrt(2) x the interaction's standard deviation (each row has its own interaction term)."""
    df = worlds - 1
    return (t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * math.sqrt(2) * \
        sigma_interaction / math.sqrt(worlds)
