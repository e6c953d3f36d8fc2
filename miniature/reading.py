"""The paper's second-order reading, measured in the miniature, and frism.py's label-free lambda
scan. Near the VLM, dL/dsigma_i ~ (h_i - 2 alpha ||B_i||^2) sigma_i: a gate closes where its
direction's vision curvature h_i exceeds its injection benefit. second_order_reading measures both
for every gated direction at FRISM's start and sets the prediction against the gates that trained
rows learned, with each agreement's chance level (Cohen's kappa). Uses frism.py, rows and stats."""
import contextlib
import functools
import json
import os
import random

import torch

from miniature import rows, stats


# Where it is measured: FRISM's start (the paper's g = 0, every gate at one half) at lam 1, on the
# calibration set; the rows whose learned gates it is set against, all from that start at lam 1.
READING = dict(lam=1.0, gate_init=0.0, draws=256, exact=48)
STAGE = "second-order reading"  # its name among a seed's stages (--full)
READ_ROWS = ("FRISM lam=1.0 alpha=0.1", "FRISM lam=1.0 alpha=1.0", "entropy lam=1.0 alpha=0.1",
             "entropy lam=1.0 alpha=1.0", "oracle lam=1.0", "dual lam=1.0 alpha=0.1 beta=1.0",
             "dual lam=1.0 alpha=0.0 beta=1.0")


def scan(world, data, out):
    """frism.py's label-free lambda scan over the TA grid, on the FRISM runs' calibration set:
    {"TA lam": KL}."""
    import frism
    argv = ["--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base", f"{world}/base",
            "--data", data["calib"], "--max-new-tokens", "16", "--batch-size", "8",
            "--out", out, "--overwrite", "--scan", *map(str, rows.LAMBDAS)]
    if frism.main(argv):
        raise SystemExit("the lambda scan failed")
    with open(os.path.join(out, "frism_report.json")) as f:
        return {f"TA {row['lam']}": row["kl"] for row in json.load(f)["scan"]}


def saved_gates(run):
    """{module path: the gate of every direction}, as the run's gated layers defined it (frism.py
    writes layer.gates(), S_eff / S, into gates/values.safetensors beside the model)."""
    import frism
    from safetensors.torch import load_file
    return load_file(os.path.join(run, frism.GATE_VALUES))


def at_the_start(world, calib, lam, gate_init):
    """frism.py's run up to its first training step: the VLM with every merged layer gated at its
    start, and the teacher's answers to the calibration set."""
    import frism
    args = frism.parse_args(["--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base",
                             f"{world}/base", "--out", "unused", "--data", calib,
                             *rows.FRISM_SETTINGS, "--lam", str(lam), "--gate-init",
                             str(gate_init)])
    model, processor = frism.load_vlm(f"{world}/vlm", args.dtype, args.device)
    model.set_attn_implementation("eager")  # exact_curvature differentiates twice
    gated = frism.inject(model, frism.safetensors_index(f"{world}/lrm", "--lrm"),
                         frism.safetensors_index(f"{world}/base", "--base"), args)
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    return model, processor, gated, answers


@contextlib.contextmanager
def gates_set_to(gated, sigma):
    """Eq. 7 with every layer's gates set to sigma[path], of any shape that broadcasts against
    (items, tokens, directions): (items, 1, r) gives each item of a batch gates of its own."""
    for path, layer in gated.items():
        layer.effective_S = functools.partial(torch.mul, sigma[path], layer.S)
    try:
        yield
    finally:
        for layer in gated.values():
            del layer.effective_S


def curvature(model, processor, gated, answers, start, draws, seed):
    """h_i, the Gauss-Newton curvature of Eq. 8 in each direction's gate sigma_i at `start` (the
    gates' values, by layer): the Fisher information of p_merged in sigma_i summed over the answer
    positions, over their number (Eq. 8's token mean). At the VLM (every gate closed) it is Eq. 8's
    Hessian; elsewhere it leaves out the part that grows with the distance between the merged
    model and the VLM (exact_curvature measures both). A Monte Carlo estimate: each draw samples
    every answer token from p_merged and backpropagates its log-probability to gates of which
    each item has its own copy; the squares of the items' gradients, summed, estimate it without
    bias (two positions' cross terms have mean zero). Returns (h, its standard error), by layer."""
    import frism
    batch, mask = frism.make_batch(processor, answers, model.device)
    sigma = {path: start[path].expand(len(answers), 1, -1).clone().requires_grad_(True)
             for path in gated}
    generator, estimates = torch.Generator().manual_seed(seed), []
    with gates_set_to(gated, sigma):
        logp = frism.answer_logp(model, batch, mask)
        for k in range(draws):
            y = torch.multinomial(logp.detach().exp(), 1, generator=generator)
            grads = torch.autograd.grad(logp.gather(1, y).sum(), list(sigma.values()),
                                        retain_graph=k < draws - 1)
            estimates.append([(g[:, 0] ** 2).sum(0) for g in grads])
    tokens = mask.sum().item()
    by_layer = [torch.stack(per_draw) / tokens for per_draw in zip(*estimates)]
    return ({path: e.mean(0) for path, e in zip(sigma, by_layer)},
            {path: e.std(0) / draws ** 0.5 for path, e in zip(sigma, by_layer)})


def exact_curvature(model, processor, gated, answers, start, directions):
    """Eq. 8 at `start` differentiated twice, exactly (double backward), in each (path, i) of
    `directions`: the Hessian's diagonal there; and Eq. 8's gradient in every gate."""
    import frism
    batch, mask = frism.make_batch(processor, answers, model.device)
    with torch.no_grad(), frism.deltas_off(gated):
        teacher = frism.answer_logp(model, batch, mask)
    sigma = {path: start[path].clone().requires_grad_(True) for path in gated}
    with gates_set_to(gated, sigma):
        kl = frism.distill_loss(frism.answer_logp(model, batch, mask), teacher)
        grads = dict(zip(sigma, torch.autograd.grad(kl, list(sigma.values()), create_graph=True)))
        hessian = [torch.autograd.grad(grads[path][i], sigma[path], retain_graph=True)[0][i].item()
                   for path, i in directions]
    return hessian, {path: g.detach() for path, g in grads.items()}


def second_order_reading(world, data, runs, seed, smoke):
    """The paper's reading, dL/dsigma_i ~ (h_i - 2 alpha ||B_i||^2) sigma_i with Eq. 9 normalised
    (||B_i||^2 = S_i^2 / sum S^2): a gate closes where the vision curvature h_i exceeds the
    injection benefit 2 alpha S_i^2 / sum S^2. Measured per direction at FRISM's start, set
    against Eq. 10's exact first step and the gates that READ_ROWS learned from that start."""
    model, processor, gated, answers = at_the_start(world, data["calib"], READING["lam"],
                                                    READING["gate_init"])
    start = {path: layer.gates() for path, layer in gated.items()}
    h, se = curvature(model, processor, gated, answers, start, 4 if smoke else READING["draws"],
                      seed)
    rng = random.Random(seed)
    directions = [(path, rng.randrange(len(gated[path].S)))
                  for path in rng.choices(list(gated), k=2 if smoke else READING["exact"])]
    exact, grad = exact_curvature(model, processor, gated, answers, start, directions)
    flat = lambda d: torch.cat([d[path].flatten().float() for path in gated])  # noqa: E731
    h_, se_, grad_ = flat(h), flat(se), flat(grad)
    S2 = torch.cat([gated[path].S ** 2 for path in gated])
    share = S2 / S2.sum()  # ||B_i||^2 in Eq. 9's normalisation
    sigma0 = flat(start)
    out = {"lam": READING["lam"], "start": sigma0[0].item(), "directions": len(h_),
           "relative_se": (se_ / h_.clamp_min(1e-30)).median().item(),
           "exact": {"h": [h_[index(gated, path, i)].item() for path, i in directions],
                     "hessian": exact, "benefit": [2 * 0.1 * share[index(gated, path, i)].item()
                                                   for path, i in directions]},
           "per_direction": {"h": h_.tolist(), "share": share.tolist(), "gates": {}},
           "alphas": {}}
    for alpha in rows.ALPHAS:
        benefit = 2 * alpha * share
        predicted_open = h_ < benefit
        first_step_opens = grad_ - benefit * sigma0 < 0  # dEq.10/dsigma_i at the start, exactly
        out["alphas"][str(alpha)] = {
            "predicted_open": predicted_open.float().mean().item(),
            "predicted_open_energy": share[predicted_open].sum().item(),
            "first_step_agrees": (first_step_opens == predicted_open).float().mean().item()}
    for name in READ_ROWS:
        record = os.path.join(runs, f"{rows.row_dir(name)}.json")
        if not os.path.exists(record):
            continue
        with open(record) as f:
            learned = flat(saved_gates(json.load(f)["model"]))
        out["per_direction"]["gates"][name] = learned.tolist()
        opened = learned > sigma0
        alpha = next((a for a in rows.ALPHAS if f"alpha={a}" in name), None)
        row = {"opened": opened.float().mean().item(), "opened_energy": share[opened].sum().item()}
        if alpha is not None:  # agreement with the reading, and what chance alone would give
            predicted_open = h_ < 2 * alpha * share
            row["agrees"], row["chance"], row["kappa"] = stats.kappa(opened.tolist(),
                                                                     predicted_open.tolist())
            row["agrees_energy"] = share[opened == predicted_open].sum().item()
        out.setdefault("rows", {})[name] = row
    gates = out["per_direction"]["gates"]
    if "oracle lam=1.0" in gates and "FRISM lam=1.0 alpha=0.1" in gates:
        oracle, frism_ = torch.tensor(gates["oracle lam=1.0"]), torch.tensor(
            gates["FRISM lam=1.0 alpha=0.1"])
        apart = (oracle > sigma0) & (frism_ < sigma0)  # the oracle opens, FRISM closes
        ratio = (h_ / (2 * 0.1 * share)).log10()
        out["oracle_opens_frism_closes"] = {
            "directions": int(apart.sum()), "energy": share[apart].sum().item(),
            "predicted_closed": (ratio[apart] > 0).float().mean().item() if apart.any() else None,
            "median_log10_h_over_benefit": ratio[apart].median().item() if apart.any() else None,
            "median_log10_h_over_benefit_elsewhere": ratio[~apart].median().item()}
    return {"reading": out}


def index(gated, path, i):
    """The position of direction i of layer `path` among every direction, in gated's order."""
    offset = 0
    for p, layer in gated.items():
        if p == path:
            return offset + i
        offset += len(layer.S)
    raise KeyError(path)

