"""Scoring in the miniature: every model through eval.py, as a user would score a merge, each row's
outcome kept item by item (so that any two rows compare paired) with, on VL reasoning, each item's
log-likelihood of its worked chain. Uses eval.py only."""
import contextlib
import io

MAX_NEW_TOKENS = 64  # the longest chain (depth 3) is 49 tokens and its end of turn


def score(models, benchmarks, out, smoke=False):
    """{row name: {"scores": {benchmark: accuracy, "cut_by_limit": % of answers cut by the token
    limit, "<benchmark>_logp": mean log-likelihood per token of the reference answers}, "items":
    {benchmark: per-item outcomes as a string of 0 and 1}, "logp": {benchmark: per-item
    log-likelihoods}}}, by eval.py (its own table is not printed: toy.py prints one of every
    row)."""
    import eval as ev
    limit = 4 if smoke else MAX_NEW_TOKENS
    with contextlib.redirect_stdout(io.StringIO()):
        report = ev.run(ev.parse_args(["--models", *models.values(), "--benchmarks", *benchmarks,
                                       "--out", out, "--max-new-tokens", str(limit),
                                       "--batch-size", "300", "--device", "cpu",
                                       "--system", ""]))
    rows = {}
    for name, path in models.items():
        results = {b: r for b, r in report["results"][path].items() if r is not None}
        cut = [p["hit_token_limit"] for r in results.values() for p in r["predictions"]]
        rows[name] = {
            "scores": {b: r["score"] for b, r in results.items()} | {
                "cut_by_limit": 100.0 * sum(cut) / max(len(cut), 1)} | {
                f"{b}_logp": r["metrics"]["reference_logp"] for b, r in results.items()
                if "reference_logp" in r["metrics"]},
            "items": {b: "".join("01"[p["correct"]] for p in r["predictions"])
                      for b, r in results.items()},
            "logp": {b: [round(p["reference_logp"], 3) for p in r["predictions"]]
                     for b, r in results.items() if "reference_logp" in r["metrics"]}}
    return rows


def world_check(world, data, runs, smoke=False):
    """Before any merge: can the LRM reason, at every depth and in both wordings, on problems it
    never trained on; can the VLM read; what does the ideal composition (VLM vision + the LRM's
    whole language model) reach? {model: scored row}."""
    text = score({"LRM": f"{world}/lrm", "BASE": f"{world}/base"},
                 [data["text_reasoning"], data["marker_reasoning"]], f"{runs}/world_text.json",
                 smoke)
    vision = score({"VLM": f"{world}/vlm", "ideal": f"{world}/ideal"},
                   [data["perception"], data["vl_reasoning"]], f"{runs}/world_vision.json", smoke)
    return {**text, **vision}
