"""Each test states one property of a baseline merge (baselines.py), on the tiny trio."""
import json
import os
import subprocess
import sys

import pytest
import torch

import baselines
import frism
from test_frism import tensors

HERE = os.path.dirname(os.path.abspath(__file__))


def merge_cli(trio, method, out, *extra):
    cmd = [sys.executable, os.path.join(HERE, "baselines.py"), method, "--vlm", trio["vlm"],
           "--lrm", trio["lrm"], "--base", trio["base"], "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))


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
    done = subprocess.run([sys.executable, os.path.join(HERE, "frism.py"), "--vlm", trio["vlm"],
                           "--lrm", trio["lrm"], "--base", trio["base"], "--no-train", "--lam",
                           "0.6", "--out", str(tmp_path / "frism")], capture_output=True)
    assert done.returncode == 0
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
