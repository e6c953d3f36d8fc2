"""Each test states one property of a baseline merge (baselines.py), on the tiny trio."""
import json
import os

import pytest
import torch

import baselines
import frism
from test_frism import cli, run_main, tensors

HERE = os.path.dirname(os.path.abspath(__file__))


def merge_cli(trio, method, out, *extra):
    return run_main(baselines.main, [method, "--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base",
                                     trio["base"], "--out", str(out), *extra])


def merged(trio, method, tmp_path, *extra):
    out = tmp_path / f"{method}{'-'.join(extra)}"
    done = merge_cli(trio, method, out, *extra)
    assert done.returncode == 0, done.stderr
    return tensors(out), json.loads((out / "baselines_report.json").read_text())


def changed_layers(trio, merged_tensors):
    vlm = tensors(trio["vlm"])
    assert merged_tensors.keys() == vlm.keys()
    return {k for k in vlm if not torch.equal(vlm[k], merged_tensors[k])}


# ---- Task Arithmetic and DARE ----------------------------------------------------------------

def test_ta_is_frism_no_train(trio, tmp_path):
    ta, _ = merged(trio, "ta", tmp_path, "--lam", "0.6")
    assert cli(trio, tmp_path / "frism", "--no-train", "--lam", "0.6").returncode == 0
    reference = tensors(tmp_path / "frism")
    assert all(torch.equal(ta[k], reference[k]) for k in reference)


def test_dare_at_density_1_is_task_arithmetic(trio, tmp_path):
    dare, _ = merged(trio, "dare", tmp_path, "--density", "1", "--lam", "0.6")
    ta, _ = merged(trio, "ta", tmp_path, "--lam", "0.6")
    assert all(torch.equal(dare[k], ta[k]) for k in ta)


def test_dare_at_density_half_moves_about_half_the_entries_by_twice_lam_tau():
    g = torch.Generator().manual_seed(0)
    W, tau = torch.randn(200, 300), torch.randn(200, 300)
    out, figures = baselines.dare(W, tau, 0.7, 0.5, g)
    moved = out != W
    assert 0.45 < moved.float().mean() < 0.55 and figures["kept"] == moved.float().mean().item()
    torch.testing.assert_close((out - W)[moved], (0.7 * tau / 0.5)[moved])


def test_dare_masks_follow_the_seed(trio, tmp_path):
    a, _ = merged(trio, "dare", tmp_path, "--density", "0.3", "--seed", "1")
    b, _ = merged(trio, "dare", tmp_path, "--density", "0.3", "--seed", "1", "--overwrite")
    c, _ = merged(trio, "dare", tmp_path, "--density", "0.3", "--seed", "2")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


# ---- TIES-Merging ----------------------------------------------------------------------------

def test_trimming_keeps_exactly_k_entries_of_largest_magnitude():
    tau = torch.randn(40, 25)
    kept = baselines.trim(tau, 0.2)
    assert (kept != 0).sum() == 200  # 0.2 x 1000
    assert kept.abs().min() == 0 and tau.abs()[kept == 0].max() <= kept.abs()[kept != 0].min()
    assert torch.equal(kept[kept != 0], tau[kept != 0])


def test_ties_elects_the_sign_of_the_sum_and_takes_the_disjoint_mean():
    W_base = torch.zeros(1, 4)
    tau_vlm = torch.tensor([[3.0, -1.0, 2.0, -2.0]])
    tau_lrm = torch.tensor([[-1.0, 2.0, 4.0, 2.0]])
    W, figures = baselines.ties(W_base, tau_vlm, tau_lrm, lam=0.5, density=1.0)
    # sums 2, 1, 6, 0 -> signs +, +, +, + (0 counts as +)
    # entry 0: only the VLM agrees; 1: only the LRM; 2: both (mean of 2 and 0.5 * 4); 3: LRM
    assert W.tolist() == [[3.0, 1.0, 2.0, 1.0]]
    assert figures["sign_conflicts"] == 0.75


def test_ties_with_a_zero_vlm_task_vector_and_density_1_is_base_plus_lam_tau_lrm():
    W_base, tau_lrm = torch.randn(6, 5), torch.randn(6, 5)
    W, _ = baselines.ties(W_base, torch.zeros(6, 5), tau_lrm, lam=0.8, density=1.0)
    torch.testing.assert_close(W, W_base + 0.8 * tau_lrm)


def test_ties_cli_changes_only_the_merged_weights(trio, tmp_path):
    ties, report = merged(trio, "ties", tmp_path)
    changed = changed_layers(trio, ties)
    assert changed and all(frism.DECODER_PATH.search(k) for k in changed)
    assert report["args"]["density"] == 0.2 and report["args"]["lam"] == 1.0
    assert len(report["layers"]) == 14
    assert all(0 <= f["sign_conflicts"] <= 1 for f in report["layers"].values())


# ---- IP-Merging -------------------------------------------------------------------------------

def test_ip_projection_is_symmetric_with_trace_sum_w2():
    Vh = torch.linalg.svd(torch.randn(12, 30), full_matrices=False)[2][:5]
    w = torch.softmax(torch.randn(5), 0)
    P = baselines.ip_projection(Vh, w)
    torch.testing.assert_close(P, P.T)
    assert torch.trace(P).item() == pytest.approx((w ** 2).sum().item(), rel=1e-5)
    torch.testing.assert_close(P @ Vh.T, Vh.T * w ** 2)  # each direction scaled by its w^2


def test_ip_threshold_above_1_leaves_the_vlm_and_0_changes_every_layer(trio, tmp_path):
    above, report = merged(trio, "ip", tmp_path, "--threshold", "1.01")
    assert changed_layers(trio, above) == set() and report["layers_passed"] == 0
    zero, report = merged(trio, "ip", tmp_path, "--threshold", "0")
    assert len(changed_layers(trio, zero)) == 14 and report["layers_passed"] == 14
    assert all(0 <= f["max_cos"] <= 1 + 1e-6 for f in report["layers"].values())


def test_ip_merged_weight_follows_its_definition():
    torch.manual_seed(0)
    W, tau_vlm, tau_lrm = torch.randn(8, 6), torch.randn(8, 6), torch.randn(8, 6)
    out, stats = baselines.ip_merging(W, tau_vlm, tau_lrm, lam=0.5, threshold=0, rank=3)
    U_A, S_A, Vh_A = torch.linalg.svd(tau_vlm, full_matrices=False)
    U_M, S_M, Vh_M = torch.linalg.svd(tau_lrm, full_matrices=False)
    c = (Vh_A[:3] @ Vh_M[:3].T).diagonal().abs()
    w = torch.softmax(32 * c, 0)
    expected = W + 0.5 * (S_A[:3].sum() / S_M[:3].sum()) * (U_M[:, :3] @ torch.diag(S_M[:3])
                                                          @ Vh_M[:3]) @ Vh_A[:3].T @ torch.diag(
        w ** 2) @ Vh_A[:3]
    torch.testing.assert_close(out, expected)
    assert stats["max_cos"] == pytest.approx(c.max().item())


# ---- outputs and refusals --------------------------------------------------------------------

def test_outputs_load_as_the_vlms_class_with_its_names_and_dtype(trio, tmp_path):
    from transformers import AutoModelForImageTextToText
    done = merge_cli(trio, "ties", tmp_path / "bf16", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    vlm, out = tensors(trio["vlm"]), tensors(tmp_path / "bf16")
    assert out.keys() == vlm.keys() and all(out[k].dtype == vlm[k].dtype for k in vlm)


@pytest.mark.parametrize("case, words", [("missing", "--base"), ("existing", "--overwrite"),
                                         ("density", "--density"), ("threshold", "--threshold"),
                                         ("lam", "--lam")])
def test_bad_input_is_refused_as_frism_does(trio, tmp_path, case, words):
    out, args, method = tmp_path / "out", [], "ties"
    if case == "missing":
        trio = dict(trio, base=str(tmp_path / "nowhere"))
    if case == "existing":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    args = {"density": ["--density", "0"], "threshold": ["--threshold", "nan"],
            "lam": ["--lam", "inf"]}.get(case, [])
    if case == "threshold":
        method = "ip"
    done = merge_cli(trio, method, out, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("baselines.py: error: ") and words in last
    assert not out.exists() or os.listdir(out) == ["keep.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_a_mismatched_lrm_is_refused(trio, wide_lrm, tmp_path):
    done = merge_cli(dict(trio, lrm=wide_lrm), "dare", tmp_path / "out")
    assert done.returncode == 2 and "intermediate_size" in done.stderr
    assert not (tmp_path / "out").exists()


# ---- the table: one row a method, the command line from it -----------------------------------

def test_a_rule_added_to_the_table_runs_through_the_same_command_line(trio, tmp_path,
                                                                       monkeypatch):
    half = baselines.Method(lambda W_vlm, W_base, tau, o: (W_vlm + 0.5 * o.lam * tau, {"x": 1.0}),
                            "Half of Task Arithmetic (a fork's example).", dict(lam=1.0))
    monkeypatch.setitem(baselines.METHODS, "half", half)
    args = ["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"]]
    assert baselines.main(["half", *args, "--out", str(tmp_path / "half"), "--lam", "1.2"]) == 0
    assert baselines.main(["ta", *args, "--out", str(tmp_path / "ta"), "--lam", "0.6"]) == 0
    ours, ta = tensors(tmp_path / "half"), tensors(tmp_path / "ta")
    assert all(torch.equal(ours[k], ta[k]) for k in ta)
    report = json.loads((tmp_path / "half" / "baselines_report.json").read_text())
    assert report["method"] == "half" and report["args"]["lam"] == 1.2
    assert (tmp_path / "half" / "README.md").exists()


def test_an_unknown_method_is_refused_by_the_command_line(trio, tmp_path):
    done = merge_cli(trio, "magic", tmp_path / "out")
    assert done.returncode == 2 and "invalid choice: 'magic'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_each_method_takes_only_its_own_flags(trio, tmp_path):
    done = merge_cli(trio, "ta", tmp_path / "out", "--density", "0.5")
    assert done.returncode == 2 and "unrecognized arguments: --density" in done.stderr


def test_every_row_of_the_table_runs_with_its_defaults_and_writes_a_model_card(trio, tmp_path):
    from huggingface_hub import ModelCard
    for method in baselines.METHODS:
        out = tmp_path / method
        done = merge_cli(trio, method, out)
        assert done.returncode == 0, (method, done.stderr)
        card = ModelCard.load(out / "README.md")
        assert card.data.base_model == [trio["vlm"], trio["lrm"]] and method in card.data.tags
        assert f"python baselines.py {method} --vlm" in card.text
        report = json.loads((out / "baselines_report.json").read_text())
        assert all(report["args"][k] == v for k, v in baselines.METHODS[method].defaults.items())


# ---- Selective rank-k transfer (Ji et al. 2026) ----------------------------------------------

def test_selective_at_full_rank_is_task_arithmetic():
    W, tau = torch.randn(12, 9), torch.randn(12, 9)
    out, figures = baselines.selective(W, tau, 0.3, 9)
    torch.testing.assert_close(out, W + 0.3 * tau, atol=1e-5, rtol=1e-5)
    assert figures["retained_energy"] == pytest.approx(1.0)


def test_selective_at_rank_1_is_a_rank_1_update_with_taus_frobenius_norm():
    torch.manual_seed(0)
    W, tau = torch.randn(12, 9), torch.randn(12, 9)
    out, figures = baselines.selective(W, tau, 0.5, 1)
    update = (out - W) / 0.5
    assert torch.linalg.matrix_rank(update).item() == 1
    assert update.norm().item() == pytest.approx(tau.norm().item(), rel=1e-5)
    S = torch.linalg.svdvals(tau)
    assert figures["retained_energy"] == pytest.approx((S[0] ** 2 / (S ** 2).sum()).item())
    u, v = torch.linalg.svd(tau)[0][:, 0], torch.linalg.svd(tau)[2][0]
    direct = torch.outer(u, v) * tau.norm()  # the top direction, scaled to ||tau||_F
    torch.testing.assert_close(update, direct, atol=1e-5, rtol=1e-4)


def test_selective_cli_records_each_layers_retained_energy(trio, tmp_path):
    out, report = merged(trio, "selective", tmp_path, "--rank", "2")
    assert report["args"]["lam"] == 0.05 and report["args"]["rank"] == 2
    assert len(report["layers"]) == 14
    assert len(changed_layers(trio, out)) == 14
    for path, figures in report["layers"].items():
        name = path.split("language_model.", 1)[1]
        from test_frism import task_vector
        S = torch.linalg.svdvals(task_vector(trio, name))
        assert figures["retained_energy"] == pytest.approx(
            ((S[:2] ** 2).sum() / (S ** 2).sum()).item(), rel=1e-4)


# ---- STAR (Lee et al., NAACL 2025) -----------------------------------------------------------

def test_star_at_eta_100_is_task_arithmetic():
    W, tau = torch.randn(10, 14), torch.randn(10, 14)
    out, figures = baselines.star(W, tau, 0.7, 100.0)
    torch.testing.assert_close(out, W + 0.7 * tau, atol=1e-5, rtol=1e-5)
    assert figures["rank"] == 10


def test_star_keeps_the_fewest_directions_reaching_eta_and_restores_the_nuclear_norm():
    torch.manual_seed(1)
    W, tau = torch.randn(16, 20), torch.randn(16, 20)
    out, figures = baselines.star(W, tau, 1.0, 40.0)
    S = torch.linalg.svdvals(tau).tolist()
    r, running = 0, 0.0
    while running < 0.4 * sum(S):  # directly: add directions until 40 % of the sum is reached
        running += S[r]
        r += 1
    assert figures["rank"] == r < len(S)
    update = out - W
    assert torch.linalg.matrix_rank(update).item() == r
    assert torch.linalg.svdvals(update).sum().item() == pytest.approx(sum(S), rel=1e-5)


def test_star_cli_records_r_per_layer(trio, tmp_path):
    out, report = merged(trio, "star", tmp_path)
    assert report["args"]["eta"] == 40.0 and report["args"]["lam"] == 1.0
    assert all(1 <= f["rank"] <= 32 for f in report["layers"].values())
    assert len(changed_layers(trio, out)) == 14


# ---- TSV-Merge (Gargiulo et al., CVPR 2025) --------------------------------------------------

def orthogonal_task_vectors(m=12, n=10, k=5):
    """Two task vectors whose top-k singular directions are mutually orthogonal."""
    torch.manual_seed(2)
    P = torch.linalg.qr(torch.randn(m, m))[0]
    Q = torch.linalg.qr(torch.randn(n, n))[0]
    S1, S2 = torch.tensor([5.0, 4, 3, 2, 1]), torch.tensor([4.5, 3.5, 2.5, 1.5, 0.5])
    return (P[:, :k] * S1) @ Q[:, :k].T, (P[:, k:2 * k] * S2) @ Q[:, k:2 * k].T


def test_tsv_with_orthogonal_task_vectors_is_the_plain_sum_of_their_truncations():
    tau_vlm, tau_lrm = orthogonal_task_vectors()
    W_base = torch.randn(12, 10)
    out, figures = baselines.tsv(W_base, tau_vlm, tau_lrm, 1.0)
    assert figures["k"] == 5 and figures["u_overlap"] < 1e-4
    torch.testing.assert_close(out, W_base + tau_vlm + tau_lrm, atol=1e-5, rtol=1e-4)


def inverse_sqrt(A):
    vals, vecs = torch.linalg.eigh(A)
    return (vecs * vals.rsqrt()) @ vecs.T


def test_tsv_follows_its_definition_with_polar_factors_computed_another_way():
    torch.manual_seed(3)
    W_base, tau_vlm, tau_lrm = (torch.randn(12, 9, dtype=torch.float64) for _ in range(3))
    out, figures = baselines.tsv(W_base, tau_vlm, tau_lrm, 0.8)
    k = 4  # min(12, 9) // 2
    A, B = (torch.linalg.svd(t, full_matrices=False) for t in (tau_vlm, tau_lrm))
    U = torch.cat([A[0][:, :k], B[0][:, :k]], 1)
    S = torch.cat([A[1][:k], B[1][:k]])
    Vh = torch.cat([A[2][:k], B[2][:k]], 0)
    U_orth = U @ inverse_sqrt(U.T @ U)  # polar factor as X (X^T X)^(-1/2)
    Vh_orth = inverse_sqrt(Vh @ Vh.T) @ Vh
    assert torch.allclose(U_orth.T @ U_orth, torch.eye(2 * k, dtype=torch.float64), atol=1e-8)
    torch.testing.assert_close(out, W_base + 0.8 * U_orth @ torch.diag(S) @ Vh_orth)
    assert figures["k"] == k


def test_tsv_cli_uses_both_task_vectors(trio, tmp_path):
    out, report = merged(trio, "tsv", tmp_path)
    assert report["args"]["alpha"] == 1.0
    assert all(f["k"] in (16, 32) for f in report["layers"].values())  # min(m, n) // 2
    assert len(changed_layers(trio, out)) == 14


def test_a_row_gives_its_own_help_for_a_shared_flag(capsys):
    """--alpha and --lam mean one thing a method: each subcommand's help says its own."""
    for method, flag, words in (("tsv", "--alpha", "scale of the merged task matrix of both task vectors"),
                                ("ta", "--lam", "weight of the LRM's task vector"),
                                ("ties", "--lam", "weight of the LRM's trimmed task vector in the disjoint mean"),
                                ("star", "--lam", "weight of the truncated update, rescaled to tau's nuclear norm")):
        with pytest.raises(SystemExit):
            baselines.parse_args([method, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"{flag} {flag[2:].upper()} {words}" in text, (method, text)
