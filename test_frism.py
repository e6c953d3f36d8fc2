"""Each test states one property of FRISM, on a tiny trio of the real Hugging Face classes."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import frism

HERE = os.path.dirname(os.path.abspath(__file__))


def settings(trio, out="unused", *extra):
    return frism.parse_args(["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"],
                             "--out", str(out), "--data", trio["data"], "--max-new-tokens", "6",
                             "--batch-size", "4", *extra])


def tensors(path):
    """Every tensor of a save_pretrained directory, by its on-disk name."""
    out = {}
    for file in sorted(f for f in os.listdir(path) if f.startswith("model") and f.endswith(
            ".safetensors")):
        out.update(load_file(os.path.join(path, file)))
    return out


def task_vector(trio, name):
    """tau of one decoder weight, read independently of frism.py."""
    lrm, base = tensors(trio["lrm"]), tensors(trio["base"])
    key = "model." + name + ".weight"
    return lrm[key].float() - base[key].float()


def merged_model(trio, *extra):
    """The VLM with every merged layer wrapped, plus the settings and the raw VLM outputs."""
    args = settings(trio, "unused", *extra)
    model, processor = frism.load_vlm(trio["vlm"], args.dtype, args.device)
    lrm = frism.safetensors_index(trio["lrm"], "--lrm")
    base = frism.safetensors_index(trio["base"], "--base")
    gated = frism.inject(model, lrm, base, args)
    return model, processor, gated, args


def a_batch(trio, processor, args):
    samples = frism.load_calibration(args)
    items = [frism.Answer(image, q, [100, 101, 102]) for image, q in samples[:3]]  # any fixed answer ids
    return frism.make_batch(processor, items, args.device)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch[0]).logits


def train(model, processor, gated, args, objective=frism.eq10):
    """The teacher's answers, then frism.train with that objective: (history, the Teacher)."""
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    teacher = frism.Teacher(model, processor, gated, answers, args)
    return frism.train(model, processor, gated, answers, teacher, objective, args), teacher


def student_and_teacher(model, gated, batch, mask):
    """log p_merged (with gradients) and log p_vlm at the answer positions of one batch."""
    with torch.no_grad(), frism.deltas_off(gated):
        teacher = frism.answer_logp(model, batch, mask)
    return frism.answer_logp(model, batch, mask), teacher


# ---- Eq. 7 -----------------------------------------------------------------------------------

def test_gates_closed_is_the_vlm_bit_for_bit(trio):
    model, processor, gated, args = merged_model(trio)
    vlm, _ = frism.load_vlm(trio["vlm"], args.dtype, args.device)
    batch = a_batch(trio, processor, args)
    for layer in gated.values():
        layer.g.data.fill_(-math.inf)
    assert torch.equal(logits(model, batch), logits(vlm, batch))
    frism.fold(model, gated)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 vlm.state_dict().values()))


def test_deltas_off_is_the_vlm_bit_for_bit(trio):
    model, processor, gated, args = merged_model(trio)
    vlm, _ = frism.load_vlm(trio["vlm"], args.dtype, args.device)
    batch = a_batch(trio, processor, args)
    with frism.deltas_off(gated):
        assert torch.equal(logits(model, batch), logits(vlm, batch))
    assert not torch.equal(logits(model, batch), logits(vlm, batch))  # and back on afterwards


def test_gates_open_is_task_arithmetic(trio):
    model, _, gated, args = merged_model(trio, "--lam", "0.7")
    for path, layer in gated.items():
        layer.g.data.fill_(math.inf)
        name = path.split("language_model.", 1)[1]
        expected = layer.base.weight + 0.7 * task_vector(trio, name)
        torch.testing.assert_close(layer.folded_weight(), expected, atol=1e-5, rtol=1e-4)


def test_low_rank_forward_equals_the_dense_eq7_layer(trio):
    _, _, gated, _ = merged_model(trio, "--lam", "0.8")
    layer = gated["model.language_model.layers.1.mlp.down_proj"]
    layer.g.data = torch.randn_like(layer.g) * 2
    x = torch.randn(3, 5, layer.base.in_features)
    dense = F.linear(x, layer.folded_weight(), layer.base.bias)
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-4)


def test_folding_preserves_the_outputs(trio):
    model, processor, gated, args = merged_model(trio)
    for layer in gated.values():
        layer.g.data = torch.randn_like(layer.g)
    batch = a_batch(trio, processor, args)
    before = logits(model, batch)
    frism.fold(model, gated)
    assert not any(isinstance(m, frism.GatedLinear) for m in model.modules())
    torch.testing.assert_close(logits(model, batch), before, atol=1e-4, rtol=1e-4)


def test_rank_keeps_the_top_k_subspaces(trio):
    _, _, gated, _ = merged_model(trio, "--rank", "5")
    layer = gated["model.language_model.layers.0.self_attn.q_proj"]
    tau = task_vector(trio, "layers.0.self_attn.q_proj")
    S = torch.linalg.svdvals(tau)
    assert layer.g.shape == (5,)
    torch.testing.assert_close(layer.S, S[:5])
    assert torch.all(layer.S[:-1] >= layer.S[1:])  # descending


def test_factors_live_in_the_working_dtype_and_gates_in_fp32(trio):
    _, _, gated, _ = merged_model(trio, "--dtype", "bfloat16")
    for layer in gated.values():
        assert layer.U.dtype == layer.Vh.dtype == layer.base.weight.dtype == torch.bfloat16
        assert layer.S.dtype == layer.g.dtype == torch.float32


# ---- Eq. 8-10 --------------------------------------------------------------------------------

def test_answer_mask_marks_the_positions_that_predict_answer_tokens(trio):
    _, processor, _, args = merged_model(trio)
    batch, mask = a_batch(trio, processor, args)
    ids = batch["input_ids"]
    for b in range(ids.shape[0]):
        positions = mask[b].nonzero().flatten()
        assert ids[b, positions + 1].tolist() == [100, 101, 102]  # the token after each is the answer
        assert batch["attention_mask"][b, positions + 1].all()


def test_distill_loss_is_the_kl_from_teacher_to_student(trio):
    model, processor, gated, args = merged_model(trio)
    batch, mask = a_batch(trio, processor, args)
    with torch.no_grad():
        with frism.deltas_off(gated):
            p = F.softmax(model(**batch).logits[mask].double(), -1)
        q = F.softmax(model(**batch).logits[mask].double(), -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean()
        loss = frism.distill_loss(*student_and_teacher(model, gated, batch, mask))
    assert loss.item() > 0
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-4)
    for layer in gated.values():
        layer.g.data.fill_(-math.inf)
    assert frism.distill_loss(*student_and_teacher(model, gated, batch, mask)).item() == 0.0


def test_inject_loss_is_the_negative_injected_energy_fraction(trio):
    _, _, gated, _ = merged_model(trio)
    assert frism.inject_loss(gated).item() == pytest.approx(-0.25)  # sigmoid(0)^2
    for layer in gated.values():
        layer.g.data = torch.randn_like(layer.g)
    energy = sum(((torch.sigmoid(l.g) * l.S) ** 2).sum() for l in gated.values())
    total = sum((l.S ** 2).sum() for l in gated.values())
    assert frism.inject_loss(gated).item() == pytest.approx(-(energy / total).item(), rel=1e-6)
    for layer in gated.values():
        layer.g.data.fill_(math.inf)
    assert frism.inject_loss(gated).item() == pytest.approx(-1.0)


def test_only_the_gates_receive_gradients(trio):
    model, processor, gated, args = merged_model(trio)
    batch, mask = a_batch(trio, processor, args)
    loss = frism.distill_loss(*student_and_teacher(model, gated, batch, mask)) + \
        frism.inject_loss(gated)
    loss.backward()
    gates = {id(layer.g) for layer in gated.values()}
    for name, p in model.named_parameters():
        if id(p) in gates:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_training_leaves_every_other_weight_untouched(trio):
    model, processor, gated, args = merged_model(trio, "--steps", "3")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".g")}
    train(model, processor, gated, args)
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # vision, embeddings, lm_head...
    assert any(not torch.equal(l.g, torch.zeros_like(l.g)) for l in gated.values())


@pytest.mark.parametrize("alpha, direction", [(0.0, -1), (50.0, +1)])
def test_gates_fall_without_inject_and_rise_with_it(trio, alpha, direction):
    model, processor, gated, args = merged_model(trio, "--steps", "20", "--lr", "0.2",
                                                 "--alpha", str(alpha))
    history, _ = train(model, processor, gated, args)
    assert direction * (history[-1]["mean_gate"] - 0.5) > 0.05
    assert direction * (history[-1]["injected"] - 0.25) > 0


def test_cached_teacher_gives_the_same_training(trio):
    histories, passes = [], []
    for extra in (["--cache-teacher", "no"], ["--cache-teacher"]):
        model, processor, gated, args = merged_model(trio, "--steps", "3", *extra)
        history, teacher = train(model, processor, gated, args)
        if args.cache_teacher == "yes":
            vocab = model.config.text_config.vocab_size
            assert [t.shape for t in teacher.kept] == [(len(a.ids), vocab) for a in teacher.answers]
        histories.append(history)
        passes.append(teacher.passes)
    for plain, cached in zip(*histories):
        assert cached["kl"] == pytest.approx(plain["kl"], rel=1e-4, abs=1e-7)
        assert cached["mean_gate"] == pytest.approx(plain["mean_gate"], rel=1e-5)
    assert passes == [3, math.ceil(len(teacher.answers) / 4)]  # a step's, or each answer's once


def test_cache_teacher_auto_caches_only_when_it_saves_passes_and_fits(trio, monkeypatch):
    answers = [frism.Answer(None, "q", [1, 2, 3]), frism.Answer(None, "q", [4, 5])]  # 5 tokens
    size = 5 * 1000 * 4  # tokens x vocabulary x fp32
    decide = lambda *flags: frism.teacher_cache_decision(answers, 1000, settings(trio, "x", *flags))
    monkeypatch.setattr(frism, "host_memory_available", lambda: 2 * size)
    assert decide("--steps", "1", "--batch-size", "4") == (True, size)  # 4 visits > 2 answers
    assert decide("--steps", "1", "--batch-size", "2") == (False, size)  # 2 visits: no pass saved
    assert decide("--steps", "1", "--batch-size", "1", "--grad-accum", "3")[0]
    monkeypatch.setattr(frism, "host_memory_available", lambda: 2 * size - 1)
    assert decide("--steps", "9") == (False, size)  # more than half the free memory
    assert decide("--steps", "9", "--cache-teacher") == (True, size)  # forced
    monkeypatch.setattr(frism, "host_memory_available", lambda: None)
    assert decide("--steps", "9") == (False, size)  # unknown memory: the safe choice
    monkeypatch.setattr(frism, "host_memory_available", lambda: 10 ** 12)
    assert decide("--steps", "9", "--cache-teacher", "no") == (False, size)


def test_a_non_finite_loss_stops_training_with_a_clear_error(trio, monkeypatch):
    model, processor, gated, args = merged_model(trio, "--steps", "2")
    answers = [frism.Answer(image, q, [100, 101]) for image, q in frism.load_calibration(args)[:2]]
    monkeypatch.setattr(frism, "distill_loss", lambda *a: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="the loss became nan at step 1"):
        frism.train(model, processor, gated, answers, frism.Teacher(
            model, processor, gated, answers, args), frism.eq10, args)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        frism.parse_args(["--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    for flag in ("--vlm", "--lrm", "--base", "--out", "--overwrite", "--data", "--data-split",
                 "--image-column", "--question-column", "--num-samples", "--max-pixels", "--lam",
                 "--alpha", "--steps", "--lr", "--batch-size", "--grad-accum", "--max-new-tokens",
                 "--rank", "--no-train", "--device", "--dtype", "--seed", "--dry-run",
                 "--device-memory", "--gradient-checkpointing", "--device-map",
                 "--cache-teacher", "--scan", "--gate-init", "--band", "--objective"):
        assert flag in text


def test_the_gates_start_where_gate_init_says(trio):
    for value, start in (("0", 0.5), ("3", 1 / (1 + math.exp(-3)))):
        _, _, gated, _ = merged_model(trio, "--gate-init", value)
        assert all(torch.all(layer.g == float(value)) for layer in gated.values())
        assert frism.mean_gate(gated) == pytest.approx(start)


def test_teacher_answers_end_at_the_end_of_turn_or_the_limit(trio):
    model, processor, gated, args = merged_model(trio)
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    stop = processor.tokenizer.eos_token_id
    assert answers
    for ids in (answer.ids for answer in answers):
        assert ids[0] != stop
        assert (ids[-1] == stop and stop not in ids[:-1]) or len(ids) == args.max_new_tokens


# ---- the command line, end to end ------------------------------------------------------------

def cli(trio, out, *extra):
    cmd = [sys.executable, os.path.join(HERE, "frism.py"), "--vlm", trio["vlm"], "--lrm",
           trio["lrm"], "--base", trio["base"], "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ,
                          HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))


@pytest.fixture(scope="module")
def frism_run(trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "merged"
    done = cli(trio, out, "--data", trio["data"], "--steps", "4", "--lam", "0.9",
               "--max-new-tokens", "6", "--rank", "40")
    assert done.returncode == 0, done.stderr
    return out


def test_cli_output_loads_and_generates_like_a_qwen_vl_checkpoint(trio, frism_run):
    model = AutoModelForImageTextToText.from_pretrained(frism_run)
    processor = AutoProcessor.from_pretrained(frism_run)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    image, question = frism.load_calibration(settings(trio))[0]
    inputs = processor(text=[frism.chat_prompt(processor, question)], images=[image],
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_cli_output_has_the_input_checkpoint_names_and_only_merged_weights_change(trio, frism_run):
    vlm, merged = tensors(trio["vlm"]), tensors(frism_run)
    assert merged.keys() == vlm.keys()
    changed = {k for k in vlm if not torch.equal(vlm[k], merged[k])}
    assert changed and all(frism.DECODER_PATH.search(k) for k in changed)
    assert len(changed) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers


def test_cli_weights_follow_eq7_with_an_independent_svd_and_the_saved_gates(trio, frism_run):
    vlm, merged = tensors(trio["vlm"]), tensors(frism_run)
    gates = load_file(os.path.join(frism_run, "frism_gates.safetensors"))
    assert len(gates) == 14
    for key, g in gates.items():
        name = key.split("language_model.", 1)[1].removesuffix(".g")
        U, S, Vh = torch.linalg.svd(task_vector(trio, name), full_matrices=False)
        k = min(40, len(S))  # k_proj and v_proj have only 32 directions
        assert g.shape == (k,)
        expected = vlm["model." + name + ".weight"] + 0.9 * (
            U[:, :k] * (torch.sigmoid(g) * S[:k])) @ Vh[:k]
        torch.testing.assert_close(merged["model." + name + ".weight"], expected,
                                   atol=1e-5, rtol=1e-4)


def test_cli_report_records_the_run(frism_run):
    report = json.load(open(os.path.join(frism_run, "frism_report.json")))
    assert report["args"]["lam"] == 0.9 and report["args"]["rank"] == 40
    assert len(report["loss_curve"]) == 4
    assert {"kl", "injected", "mean_gate", "loss"} <= report["loss_curve"][0].keys()
    assert {"check", "load", "svd", "teacher", "train", "fold"} <= report["seconds"].keys()
    assert report["memory"]["peak_rss_gib"] > 0 and report["versions"]["torch"]
    # --cache-teacher auto: 4 steps x 4 questions visit more answers than there are
    assert report["calibration"]["answers"] < 16 and report["calibration"]["teacher_cached"]
    stats = report["gates"]["model.language_model.layers.0.mlp.up_proj"]
    assert stats["rank"] == 40 and 0 < stats["injected"] < 1
    assert report["gates"]["model.language_model.layers.0.self_attn.k_proj"]["rank"] == 32


def test_cli_no_train_is_exact_task_arithmetic(trio, tmp_path):
    done = cli(trio, tmp_path / "ta", "--no-train", "--lam", "0.5")
    assert done.returncode == 0, done.stderr
    vlm, lrm, base = tensors(trio["vlm"]), tensors(trio["lrm"]), tensors(trio["base"])
    merged = tensors(tmp_path / "ta")
    for key in vlm:
        expected = vlm[key]
        if frism.DECODER_PATH.search(key):
            expected = vlm[key] + 0.5 * (lrm[key] - base[key])
        assert torch.equal(merged[key], expected), key
    report = json.load(open(tmp_path / "ta" / "frism_report.json"))
    assert report["args"]["lam"] == 0.5 and report["args"]["no_train"]
    gates = load_file(tmp_path / "ta" / "frism_gates.safetensors")
    assert all(torch.all(g == math.inf) for g in gates.values())


def test_no_train_with_rank_is_truncated_task_arithmetic(trio, tmp_path):
    assert cli(trio, tmp_path / "ta", "--no-train", "--rank", "3", "--lam", "1").returncode == 0
    vlm, merged = tensors(trio["vlm"]), tensors(tmp_path / "ta")
    key = "model.layers.1.mlp.gate_proj.weight"
    U, S, Vh = torch.linalg.svd(task_vector(trio, "layers.1.mlp.gate_proj"), full_matrices=False)
    torch.testing.assert_close(merged[key], vlm[key] + (U[:, :3] * S[:3]) @ Vh[:3],
                               atol=1e-5, rtol=1e-4)


# ---- bad input: one sentence on stderr, non-zero exit, nothing written -----------------------

def assert_refused(done, out, words):
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("frism.py: error: ") and words in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(out) or os.listdir(out) == ["keep.txt"]
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".partial-" in p]


def test_mismatched_lrm_is_refused(trio, wide_lrm, tmp_path):
    done = cli(dict(trio, lrm=wide_lrm), tmp_path / "out", "--no-train")
    assert_refused(done, tmp_path / "out", "intermediate_size")


def test_missing_path_is_refused(trio, tmp_path):
    done = cli(dict(trio, base=str(tmp_path / "nowhere")), tmp_path / "out", "--no-train")
    assert_refused(done, tmp_path / "out", "--base")


def test_unknown_hub_id_is_refused_offline(trio, tmp_path):
    done = cli(dict(trio, lrm="no-such-org/no-such-model"), tmp_path / "out", "--no-train")
    assert_refused(done, tmp_path / "out", "hub")


def test_existing_out_is_never_overwritten_without_overwrite(trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_refused(cli(trio, out, "--no-train"), out, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    assert cli(trio, out, "--no-train", "--overwrite").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_out_inside_an_input_is_refused(trio, tmp_path):
    done = cli(trio, os.path.join(trio["vlm"], "merged"), "--no-train", "--overwrite")
    assert done.returncode == 2 and "overlaps" in done.stderr


def test_empty_data_is_refused(trio, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_refused(cli(trio, tmp_path / "out", "--data", str(empty)), tmp_path / "out",
                   "no calibration questions")


def test_data_with_a_missing_image_is_refused(trio, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nope.png", "question": "What?"}) + "\n")
    assert_refused(cli(trio, tmp_path / "out", "--data", str(bad)), tmp_path / "out", "line 1")


def test_an_existing_file_at_out_is_refused_as_a_file_not_as_a_directory(trio, tmp_path):
    out = tmp_path / "out"
    out.write_text("precious")
    for extra in ((), ("--overwrite",)):
        done = cli(trio, out, "--no-train", *extra)
        assert done.returncode == 2 and "is a file, not a directory" in done.stderr
        assert "--overwrite" not in done.stderr  # it could not help: never ask for it
    assert out.read_text() == "precious"


# Every pair of flags where one voids or contradicts the other, and what was decided for it:
# ("refused", words of the one sentence) or ("defined", what the combination does).
# {out}, {data}, {dir} stand for a new output directory, the calibration set, a full directory.
FLAG_DECISIONS = [
    ("frism", ["--scan", "0.1", "--no-train"], "refused", "--scan has no effect with --no-train"),
    ("frism", ["--scan", "0.1", "--dry-run"], "refused", "--scan has no effect with --dry-run"),
    ("frism", ["--no-train", "--dry-run"], "refused", "--no-train has no effect with --dry-run"),
    ("frism", ["--no-train", "--alpha", "0.5"], "refused", "--alpha has no effect with --no-train"),
    ("frism", ["--no-train", "--data", "{data}"], "refused", "--data has no effect with --no-train"),
    ("frism", ["--no-train", "--objective", "entropy"], "refused",
     "--objective has no effect with --no-train"),
    ("frism", ["--no-train", "--seed", "3"], "refused", "--seed has no effect with --no-train"),
    ("frism", ["--scan", "0.1", "--lam", "0.3"], "refused", "--lam has no effect with --scan"),
    ("frism", ["--scan", "0.1", "--steps", "5"], "refused", "--steps has no effect with --scan"),
    ("frism", ["--scan", "0.1", "--gate-init", "4"], "refused",
     "--gate-init has no effect with --scan"),
    ("frism", ["--band", "1", "4", "--rank", "3"], "refused", "--rank has no effect with --band"),
    ("frism", ["--device-memory", "10", "--no-train"], "refused",
     "--device-memory has no effect without --dry-run"),
    ("frism", ["--device-map", "auto", "--device", "cpu"], "refused",
     "--device has no effect with --device-map"),
    ("frism", ["--device-map", "auto", "--dry-run"], "refused",
     "--device-map has no effect with --dry-run"),
    ("frism-no-out", ["--scan", "0.1", "--overwrite", "--data", "{data}"], "refused",
     "--overwrite has no effect without --out"),
    ("frism", ["--dry-run", "--out", "{dir}"], "refused", "pass --overwrite"),  # checked as a run
    ("frism", ["--dry-run", "--out", "{out}", "--alpha", "0.5"], "defined",
     "the plan of the run these flags describe; --out checked, nothing written"),
    ("frism", ["--scan", "0.5", "1", "--rank", "4", "--data", "{data}"], "defined",
     "truncated Task Arithmetic's KL"),
    ("frism", ["--objective", "entropy", "--cache-teacher", "yes", "--data", "{data}"], "defined",
     "an objective that never reads the teacher never caches it"),
    ("baselines", ["ta", "--density", "0.5"], "refused", "unrecognized arguments: --density"),
    ("eval", ["--resume"], "defined", "no results file yet: everything is scored, and it says so"),
]


@pytest.mark.parametrize("program, extra, decision, what", FLAG_DECISIONS,
                         ids=[" ".join(case[1]) for case in FLAG_DECISIONS])
def test_flags_that_void_each_other_are_refused_or_defined(trio, tmp_path, capsys, program,
                                                          extra, decision, what):
    import baselines
    import eval as ev
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    extra = [a.format(out=tmp_path / "out", data=trio["data"], dir=full) for a in extra]
    models = ["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"]]
    small = ["--max-new-tokens", "6", "--steps", "2"] if "--scan" not in extra else [
        "--max-new-tokens", "6"]
    if program == "baselines":
        with pytest.raises(SystemExit) as done:
            baselines.main(extra[:1] + models + ["--out", str(tmp_path / "out")] + extra[1:])
        code = done.value.code
    elif program == "eval":
        bench = tmp_path / "bench.jsonl"
        bench.write_text(json.dumps({"question": "What is 2 + 2?", "answer": 4,
                                     "kind": "reasoning"}) + "\n")
        code = ev.main(["--models", trio["vlm"], "--benchmarks", str(bench), "--max-new-tokens",
                        "2", "--out", str(tmp_path / "results.json"), *extra])
    else:
        given = program == "frism-no-out" or "--out" in extra or "--dry-run" in extra
        out = [] if given else ["--out", str(tmp_path / "out")]
        code = frism.main(models + out + (small if decision == "defined" else []) + extra)
    err = capsys.readouterr().err
    if decision == "refused":
        lines = err.strip().splitlines()  # one sentence (argparse puts its usage line first)
        assert code == 2 and what in lines[-1] and len(lines) <= 2 and "Traceback" not in err, err
        assert (full / "keep.txt").read_text() == "precious"
        assert not (tmp_path / "out").exists()
        return
    assert code == 0, err
    if "--dry-run" in extra:
        assert not (tmp_path / "out").exists()
    elif "--scan" in extra:
        report = json.loads((tmp_path / "out" / "frism_report.json").read_text())
        assert report["args"]["rank"] == 4 and [r["lam"] for r in report["scan"]] == [0.5, 1.0]
    elif "entropy" in extra:
        report = json.loads((tmp_path / "out" / "frism_report.json").read_text())
        assert report["calibration"]["teacher_passes"] == 0
        assert not report["calibration"]["teacher_cached"]
    else:
        assert "does not exist yet" in err and (tmp_path / "results.json").exists()


def test_every_flag_pair_frism_voids_is_in_the_decision_table():
    """VOIDED and VOIDED_UNLESS are the rule, FLAG_DECISIONS the statement: every pair of the rule
    is stated (one flag of each group is enough for the groups --no-train and --scan void)."""
    cases = [set(extra) for program, extra, decision, _ in FLAG_DECISIONS
             if program.startswith("frism") and decision == "refused"]
    groups = frism.TRAINING + frism.DATA + ("lam", "seed")
    for dest, by, _ in frism.VOIDED:
        if dest not in groups:
            assert any({frism.flag_name(dest), frism.flag_name(by)} <= c for c in cases), dest
    for dest, needs, _ in frism.VOIDED_UNLESS:
        assert any(frism.flag_name(dest) in c and frism.flag_name(needs) not in c
                   for c in cases), dest


def test_a_band_beyond_every_layers_rank_is_refused_before_loading_the_vlm(trio, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.setattr(frism, "load_vlm", lambda *a, **k: pytest.fail("the VLM was loaded"))
    for extra in (["--no-train"], ["--data", trio["data"]], ["--dry-run"]):
        code = frism.main(["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"],
                           "--band", "65", "70", *extra] + (
            ["--out", str(tmp_path / "out")] if "--dry-run" not in extra else []))
        err = capsys.readouterr().err
        assert code == 2 and "--band 65 70 selects no direction: the largest rank of a merged " \
            "layer is 64." in err, err
    assert not (tmp_path / "out").exists()


def test_a_band_empty_in_some_layers_says_so_and_leaves_them_the_vlms(trio, tmp_path):
    done = cli(trio, tmp_path / "out", "--no-train", "--band", "33", "64")
    assert done.returncode == 0, done.stderr
    assert "--band 33 64 selects nothing in 4 of 14 merged layers (rank below 33): they stay " \
        "the VLM's." in done.stderr  # k and v (32 x 64) of both layers
    vlm, merged = tensors(trio["vlm"]), tensors(tmp_path / "out")
    changed = {k for k in vlm if not torch.equal(vlm[k], merged[k])}
    assert changed and not any("k_proj" in k or "v_proj" in k for k in changed)


def test_eq9_is_zero_not_nan_when_the_kept_directions_carry_no_energy(trio):
    _, _, gated, _ = merged_model(trio)
    for layer in gated.values():
        layer.S.zero_()
    assert frism.inject_loss(gated).item() == 0.0
    assert all(s["injected"] == 0.0 for s in frism.gate_statistics(gated).values())


def test_the_same_checkpoint_as_lrm_and_base_is_refused(trio, tmp_path):
    assert_refused(cli(dict(trio, base=trio["lrm"]), tmp_path / "out", "--no-train"),
                   tmp_path / "out", "nothing to inject")


def test_a_crash_while_saving_leaves_no_model_behind(trio, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")
    args = settings(trio, tmp_path / "out", "--no-train")
    model, processor = frism.load_vlm(trio["vlm"], args.dtype, args.device)
    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError):
        frism.save(model, processor, args.out, torch.float32, {})
    assert os.listdir(tmp_path) == []


# ---- hub paths, exercised offline through stand-ins with the same layout ---------------------

def vizwiz_rows(trio):
    from PIL import Image
    root = os.path.dirname(trio["data"])
    rows = [json.loads(line) for line in open(trio["data"])]
    return {"question_id": [f"VizWiz_val_{i:08d}.jpg" for i in range(len(rows))],
            "image": [Image.open(os.path.join(root, r["image"])) for r in rows],
            "question": [r["question"] for r in rows],
            "answers": [[r["answer"]] * 10 for r in rows],
            "category": ["number"] * len(rows)}


def test_hub_dataset_layout_is_read_with_the_vizwiz_columns(trio, tmp_path):
    """lmms-lab/VizWiz-VQA is parquet under data/{split}-*.parquet: the same load_dataset call."""
    import datasets
    ds = datasets.Dataset.from_dict(vizwiz_rows(trio)).cast_column("image", datasets.Image())
    os.makedirs(tmp_path / "data")
    ds.to_parquet(str(tmp_path / "data" / "val-00000-of-00001.parquet"))
    args = settings(trio, "unused", "--data", str(tmp_path), "--num-samples", "5")
    samples = frism.load_calibration(args)
    assert len(samples) == 5 and samples[0][1] == "What number is shown?"
    assert samples[0][0].mode == "RGB"


def test_saved_dataset_and_a_missing_column_are_handled(trio, tmp_path):
    import datasets
    datasets.Dataset.from_dict(vizwiz_rows(trio)).save_to_disk(str(tmp_path / "saved"))
    args = settings(trio, "unused", "--data", str(tmp_path / "saved"))
    assert len(frism.load_calibration(args)) == 8
    args = settings(trio, "unused", "--data", str(tmp_path / "saved"), "--question-column", "q")
    with pytest.raises(frism.InputError, match="no column 'q'"):
        frism.load_calibration(args)


def test_large_images_are_shrunk_to_max_pixels():
    from PIL import Image
    image = frism.fit_pixels(Image.new("L", (4000, 3000)), 512 * 28 * 28)
    assert image.mode == "RGB" and image.size[0] * image.size[1] <= 512 * 28 * 28
    assert abs(image.size[0] / image.size[1] - 4 / 3) < 0.01


def test_hub_model_ids_resolve_through_the_hub_cache(trio, tmp_path, monkeypatch):
    """A hub id goes through snapshot_download; offline, a cached snapshot is what it returns."""
    import shutil
    snapshot = tmp_path / "models--org--tiny-lrm" / "snapshots" / ("0" * 40)
    shutil.copytree(trio["lrm"], snapshot)
    (tmp_path / "models--org--tiny-lrm" / "refs").mkdir()
    (tmp_path / "models--org--tiny-lrm" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert os.path.samefile(frism.local_dir("org/tiny-lrm", "--lrm"), snapshot)


def test_soft_config_differences_only_warn(trio):
    from transformers import AutoConfig
    vlm = frism.language_config(frism.load_config(trio["vlm"], "--vlm"))
    other = AutoConfig.from_pretrained(trio["lrm"])
    other.rope_parameters = dict(other.rope_parameters, rope_theta=1e6)
    other.vocab_size += 10
    with pytest.warns(UserWarning) as caught:
        frism.check_configs(vlm, {"--lrm": other})
    assert ["rope_theta" in str(w.message) for w in caught] == [True, False]
    assert "vocab_size" in str(caught[1].message)
    other.num_key_value_heads = 4
    with pytest.raises(frism.InputError, match="num_key_value_heads"):
        frism.check_configs(vlm, {"--lrm": other})


# ---- the paper in miniature (toy.py), smoke-sized --------------------------------------------

# What each row of the miniature must show in its output: (row-name pattern, check of its report).
# A new line of toy.MINIATURE needs its expectation here.
ROW_EXPECTATIONS = [
    ("VLM", lambda report: report is None),  # the VLM itself, no merge
    ("TA [0-9]*", lambda r: r["method"] == "ta"),
    ("TIES", lambda r: r["method"] == "ties"),
    ("DARE", lambda r: r["method"] == "dare"),
    ("IP T=*", lambda r: r["method"] == "ip"),
    ("selective *", lambda r: r["method"] == "selective"),
    ("STAR *", lambda r: r["method"] == "star"),
    ("TSV *", lambda r: r["method"] == "tsv"),
    ("FRISM *", lambda r: r["objective"].startswith("eq10") and len(r["loss_curve"]) == 2),
    ("FRISM open *", lambda r: r["args"]["gate_init"] == 4.0),
    ("entropy *", lambda r: r["objective"].startswith("entropy") and "kl" not in r["loss_curve"][0]
     and r["calibration"]["teacher_passes"] == 0),
    ("oracle *", lambda r: "toy.oracle" in r["objective"] and "chain_ce" in r["loss_curve"][0]),
    ("TA top-*", lambda r: r["args"]["no_train"] and r["args"]["lam"] == 1.0),
    ("band *", lambda r: r["args"]["no_train"] and r["args"]["band"]),
    ("FRISM alpha=0.1 lam=*", lambda r: r["args"]["alpha"] == 0.1),
]


def row_report(summary, name):
    path = summary["per_seed"][0]["models"][name]
    for file in ("frism_report.json", "baselines_report.json"):
        if os.path.exists(os.path.join(path, file)):
            return json.loads(open(os.path.join(path, file)).read())
    return None


def test_toy_world_runs_end_to_end(tmp_path):
    """A few steps of every stage: the world trains, is checked, scanned, merged by every row of
    the miniature's table (--full), scored, plotted; each row made as its line says."""
    import fnmatch
    import toy
    assert toy.main(["--dir", str(tmp_path), "--smoke", "--full"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["world_check"]) == {"LRM", "BASE", "VLM", "ideal"}
    assert {"text_reasoning", "marker_reasoning"} <= summary["world_check"]["LRM"].keys()
    assert {"perception", "vl_reasoning"} <= summary["world_check"]["ideal"].keys()
    names = [name for line in toy.MINIATURE for name in line.rows()]
    assert list(summary["rows"]) == names and len(set(names)) == len(names)  # the table's order
    assert all(0 <= low <= mean <= high <= 100 for row in summary["rows"].values()
               for column, (mean, low, high) in row.items() if column != "scan_kl")
    assert all("scan_kl" in summary["rows"][f"TA {lam}"] for lam in toy.LAMBDAS)
    assert -1 <= summary["scan_spearman"][0] <= 1
    assert summary["lambda_rule"][0]["pick"] in toy.LAM_GRID
    for name in names:
        checks = [check for pattern, check in ROW_EXPECTATIONS if fnmatch.fnmatchcase(name, pattern)]
        assert checks, f"row {name!r} has no expectation in ROW_EXPECTATIONS"
        assert all(check(row_report(summary, name)) for check in checks), name
    report = row_report(summary, "FRISM lam=2.0 alpha=1.0")
    assert report["args"]["lam"] == 2.0 and report["calibration"]["questions"] == 8
    assert row_report(summary, "band 5-16 lam=1.0")["args"]["band"] == [5, 16]
    assert row_report(summary, "TA top-4")["args"]["rank"] == 4  # at lambda 1, as the plot says
    for plot in ("tradeoff.png", "gates.png", "bands.png", "lam.png"):
        assert (tmp_path / plot).stat().st_size > 1000

    # --only: the named rows made anew, every other row kept from the last run
    runs = tmp_path / "seed-0" / "runs"
    before = {p.name: p.stat().st_mtime_ns for p in runs.iterdir() if p.is_dir()}
    assert toy.main(["--dir", str(tmp_path), "--smoke", "--only", "entropy lam=1.0*",
                     "TSV (α grid)"]) == 0
    again = json.loads((tmp_path / "summary.json").read_text())
    assert list(again["rows"]) == names  # the cached rows beside the new ones, in the same order
    made = {"entropy_lam-1.0_alpha-0.1", "entropy_lam-1.0_alpha-1.0"} | {
        f"TSV_{lam}" for lam in toy.LAMBDAS}
    after = {p.name: p.stat().st_mtime_ns for p in runs.iterdir() if p.is_dir()}
    assert {name for name in before if after[name] != before[name]} == made
    assert sorted(again["per_seed"][0]["only"]) == sorted(
        n for n in names if n.startswith("entropy lam=1.0") or n.startswith("TSV "))
    with pytest.raises(SystemExit, match="names no row"):
        toy.main(["--dir", str(tmp_path), "--smoke", "--only", "no such method"])

    assert toy.main(["--dir", str(tmp_path), "--smoke", "--seeds", "2"]) == 0  # seed 0 reused
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == 2 and len(summary["per_seed"]) == 2


def test_the_oracle_trains_only_gate_parameters_on_labelled_chains(trio, tmp_path):
    """toy.py's oracle is frism.py's training loop with another objective: KL + cross-entropy on
    VL-reasoning chains. It moves the gates, nothing else, and differently from Eq. 10."""
    import toy
    model, processor, gated, args = merged_model(trio, "--steps", "3", "--gate-init", "4")
    chains = toy.reasoning_chains(processor, 8, seed=0)
    assert all(c.question == toy.VL_REASONING_QUESTION and c.ids[-1] ==
               processor.tokenizer.convert_tokens_to_ids("<|im_end|>") for c in chains)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".g")}
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    objective = toy.oracle(chains, seed=0)(model, processor, gated, answers, args)
    batch, mask = frism.make_batch(processor, chains[:8], args.device)
    targets = batch["input_ids"].roll(-1, dims=1)[mask]
    assert torch.equal(targets, torch.tensor([t for c in chains[:8] for t in c.ids]))
    history = frism.train(model, processor, gated, answers, frism.Teacher(
        model, processor, gated, answers, args), objective, args)
    assert {"loss", "kl", "chain_ce", "mean_gate"} <= history[-1].keys()
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(not torch.all(l.g == 4.0) for l in gated.values())


def test_a_band_injected_alone_is_eq7_with_its_gates_open_and_all_others_closed(trio, tmp_path):
    assert cli(trio, tmp_path / "band", "--no-train", "--band", "2", "4", "--lam", "0.7"
               ).returncode == 0
    merged = tensors(tmp_path / "band")
    model, _, gated, _ = merged_model(trio, "--lam", "0.7")
    for layer in gated.values():
        layer.g.data.fill_(-math.inf)
        layer.g.data[1:4] = math.inf  # directions 2, 3 and 4 (1-based)
    frism.fold(model, gated)
    for key, value in model.state_dict().items():
        if frism.DECODER_PATH.search(key):
            on_disk = key.replace("model.language_model.", "model.")
            torch.testing.assert_close(merged[on_disk], value, atol=1e-5, rtol=1e-4)
    assert cli(trio, tmp_path / "x", "--no-train", "--band", "3", "2").returncode == 2


def test_the_scan_rank_correlation_is_the_spearman_coefficient():
    import toy
    assert toy.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert toy.spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    assert toy.spearman([1, 2, 3], [1, 1, 1]) == 0.0
    # ranks 1, 2.5, 2.5, 4 against 1..4: the textbook value with a tie
    assert toy.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)


@pytest.mark.toy
def test_the_scans_kl_rises_where_task_arithmetics_perception_falls(tmp_path):
    """The lambda scan, validated where perception can be measured: over the miniature's Task
    Arithmetic grid (seed 0), its label-free KL against TA's toy perception has a rank
    correlation of -0.8 or below. Uses the world `python toy.py` cached, else builds one."""
    import baselines
    import toy
    world = os.path.join(HERE, "toy_world", "seed-0", "world")
    if not os.path.isfile(os.path.join(world, "done")):
        world = str(tmp_path / "world")
        toy.build_world(world, seed=0)
    data = toy.write_benchmarks(str(tmp_path / "benchmarks"), 100, seed=1)
    kl = toy.scan(world, data, str(tmp_path), smoke=False)
    models = {}
    for lam in toy.LAMBDAS:
        models[f"TA {lam}"] = str(tmp_path / f"ta-{lam}")
        assert baselines.main(["ta", "--vlm", f"{world}/vlm", "--lrm", f"{world}/lrm", "--base",
                               f"{world}/base", "--lam", str(lam), "--out",
                               models[f"TA {lam}"]]) == 0
    rows = toy.score(models, [data["perception"]], str(tmp_path / "scores.json"))
    rho = toy.spearman([kl[name] for name in models], [rows[name]["perception"] for name in models])
    assert rho <= -0.8, (kl, rows)


def test_toy_tokenizer_gives_every_digit_one_token():
    import toy
    tok = toy.make_tokenizer(["0123456789"], vocab_size=256 + len(toy.SPECIAL_TOKENS))
    assert len(tok) == 263
    assert len(tok("6 x 7 = 42.").input_ids) == len("6 x 7 = 42.")
    text = toy.prompt("What number is shown?") + toy.perceive(3)
    assert tok.decode(tok(text).input_ids) == text
    processor = toy.make_processor(tok)  # the hand-written prompt is the chat template's
    messages = [{"role": "user", "content": "What number is shown?"}]
    assert toy.prompt("What number is shown?") == processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


# ---- scale: precision, checkpointing, device maps, the memory plan ---------------------------

def test_bf16_fold_stays_within_bf16_rounding_of_the_fp32_fold(trio):
    folds = {}
    for dtype in ("float32", "bfloat16"):
        _, _, gated, _ = merged_model(trio, "--dtype", dtype, "--lam", "0.8")
        torch.manual_seed(0)
        folds[dtype] = {p: (l.g.data.copy_(torch.randn_like(l.g)), l.folded_weight())[1]
                        for p, l in gated.items()}
    for path, w32 in folds["float32"].items():
        w16 = folds["bfloat16"][path]
        assert w16.dtype == torch.bfloat16
        eps = torch.finfo(torch.bfloat16).eps  # 2^-7: one bf16 rounding step, relative
        torch.testing.assert_close(w16.float(), w32, rtol=eps, atol=eps * w32.abs().max().item())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's VmRSS")
def test_freed_tensors_go_back_to_the_os():
    """glibc raises its mmap threshold when a big block is freed, so later tensors come from a heap
    that keeps them resident once freed; frugal_host_memory (called by every run) stops that."""
    def kept_mib(fixed):
        code = "\n".join([
            "import torch, frism",
            "rss = lambda: next(int(l.split()[1]) for l in open('/proc/self/status')",
            "                   if l.startswith('VmRSS:')) / 1024",
            "frism.frugal_host_memory()" if fixed else "",
            "torch.ones(4 << 20)  # a 16 MiB block, freed at once",
            "before = rss()",
            "blocks = [torch.ones(2 << 20) for _ in range(50)]  # 50 x 8 MiB",
            "del blocks[:-1]  # all but the last, which sits above the others",
            "print(rss() - before)"])
        return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    cwd=HERE, check=True).stdout)
    if kept_mib(False) < 300:
        pytest.skip("this allocator returns freed blocks by itself")
    assert kept_mib(True) < 16  # only the live 8 MiB block


def test_gradient_checkpointing_changes_memory_not_the_gradients(trio):
    grads = []
    for extra in ([], ["--gradient-checkpointing"]):
        model, processor, gated, args = merged_model(trio, "--steps", "1", "--lr", "0", *extra)
        answers = [frism.Answer(image, q, [100, 101, 102]) for image, q in frism.load_calibration(args)[:4]]
        frism.train(model, processor, gated, answers, frism.Teacher(
            model, processor, gated, answers, args), frism.eq10, args)
        layer = gated["model.language_model.layers.1.mlp.up_proj"]
        batch, mask = frism.make_batch(processor, answers[:2], "cpu")
        with frism.checkpointing(model, bool(extra)):
            frism.distill_loss(*student_and_teacher(model, gated, batch, mask)).backward()
        grads.append(layer.g.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def test_device_map_auto_gives_the_same_merge(trio, frism_run, tmp_path):
    out = tmp_path / "mapped"
    done = cli(trio, out, "--data", trio["data"], "--steps", "4", "--lam", "0.9",
               "--max-new-tokens", "6", "--rank", "40", "--device-map", "auto")
    assert done.returncode == 0, done.stderr
    same, mapped = tensors(frism_run), tensors(out)
    for key in same:
        torch.testing.assert_close(mapped[key], same[key], atol=1e-6, rtol=1e-5)


def published(tmp_path, name, cfg):
    path = tmp_path / name
    cfg.save_pretrained(path)
    return str(path)


def qwen25_vl(text, out):
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=out,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31]), tie_word_embeddings=text["tie_word_embeddings"])


def qwen2(**dims):
    from transformers import Qwen2Config
    return Qwen2Config(**dims)


# Dimensions from the model cards' config.json files (no download).
DIMS_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False)
DIMS_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
               tie_word_embeddings=True)


@pytest.fixture(scope="module")
def paper_pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards")
    return {
        "7b": dict(
            vlm=published(tmp, "Qwen2.5-VL-7B-Instruct", qwen25_vl(
                dict(DIMS_7B, rope_theta=1e6, max_position_embeddings=128000), 3584)),
            lrm=published(tmp, "DeepSeek-R1-Distill-Qwen-7B", qwen2(
                **DIMS_7B, rope_theta=1e4, max_position_embeddings=131072)),
            base=published(tmp, "Qwen2.5-Math-7B", qwen2(
                **DIMS_7B, rope_theta=1e4, max_position_embeddings=4096))),
        "3b": dict(
            vlm=published(tmp, "Qwen2.5-VL-3B-Instruct", qwen25_vl(
                dict(DIMS_3B, rope_theta=1e6, max_position_embeddings=128000), 2048)),
            lrm=published(tmp, "SmallThinker-3B-Preview", qwen2(
                **DIMS_3B, rope_theta=1e6, max_position_embeddings=32768)),
            base=published(tmp, "Qwen2.5-3B-Instruct", qwen2(
                **DIMS_3B, rope_theta=1e6, max_position_embeddings=32768)))}


def plan_for(pair, *extra):
    args = frism.parse_args(["--vlm", pair["vlm"], "--lrm", pair["lrm"], "--base", pair["base"],
                             "--dry-run", "--dtype", "bfloat16", *extra])
    return frism.run(args)["plan"]


@pytest.mark.parametrize("size, published_params", [("7b", 8.29e9), ("3b", 3.75e9)])
def test_parameter_count_from_the_config_matches_the_model_cards(paper_pairs, size,
                                                                  published_params):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(paper_pairs[size]["vlm"])
    assert frism.counted_parameters(cfg) == pytest.approx(published_params, rel=0.01)


def test_parameter_count_from_the_config_is_exact_for_a_real_checkpoint(trio):
    cfg = frism.load_config(trio["vlm"], "--vlm")
    exact, source = frism.parameter_count(trio["vlm"], cfg)
    assert source == "safetensors headers" and frism.counted_parameters(cfg) == exact


def test_dry_run_7b_pair_fits_one_80gb_gpu_at_full_rank(paper_pairs, capsys):
    with pytest.warns(UserWarning) as caught:
        plan = plan_for(paper_pairs["7b"], "--device-memory", "80")
    assert any("rope_theta" in str(w.message) for w in caught)  # 1e6 against 1e4 (R1-Distill)
    assert plan["fits"] and plan["total_gib"] <= 80
    assert 15 < plan["items"]["VLM weights"] < 16  # 8.29 B parameters in bf16
    assert plan["items"]["frozen factors U, S, Vh"] > plan["items"]["VLM weights"]
    printed = capsys.readouterr().out
    assert "VLM weights" in printed and "fits" in printed


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dry_run_3b_pair_fits_one_24gb_gpu_or_names_the_rank_that_does(paper_pairs, capsys):
    plan = plan_for(paper_pairs["3b"], "--device-memory", "24")
    assert plan["fits"] or plan["rank_that_fits"]
    if not plan["fits"]:
        assert f"--rank {plan['rank_that_fits']} fits" in capsys.readouterr().out
        smaller = plan_for(paper_pairs["3b"], "--device-memory", "24",
                           "--rank", str(plan["rank_that_fits"]))
        assert smaller["fits"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dry_run_plan_shrinks_with_rank_and_checkpointing(paper_pairs):
    full = plan_for(paper_pairs["7b"])
    ranked = plan_for(paper_pairs["7b"], "--rank", "256")
    checkpointed = plan_for(paper_pairs["7b"], "--gradient-checkpointing")
    assert ranked["items"]["frozen factors U, S, Vh"] < full["items"]["frozen factors U, S, Vh"] / 5
    assert checkpointed["items"]["activations (estimate)"] < full["items"]["activations (estimate)"]
    assert full["fits"] is None  # no device memory given on a CPU machine: no verdict


def test_dry_run_reads_no_weights_and_writes_nothing(trio, tmp_path):
    done = cli(trio, tmp_path / "out", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "safetensors headers" in done.stdout and not (tmp_path / "out").exists()


def test_dry_run_refuses_mismatched_models(trio, wide_lrm, tmp_path):
    done = cli(dict(trio, lrm=wide_lrm), tmp_path / "out", "--dry-run")
    assert done.returncode == 2 and "intermediate_size" in done.stderr


# ---- benchmark: a trio shaped like Qwen2.5-0.5B, on the CPU (pytest -m bench -s) -------------

def write_shaped_trio(root, seed=0):
    """Random weights in the real layout: hidden 896, FFN 4864, 24 layers, 14 heads, 2 kv heads;
    the LRM = base + a low-rank-plus-noise update; the VLM's language model = base + noise."""
    import toy
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    tok = toy.make_tokenizer(["0123456789"], vocab_size=263)
    ids = toy.special_ids(tok)
    text = dict(vocab_size=len(tok), hidden_size=896, intermediate_size=4864,
                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    base = Qwen2ForCausalLM(Qwen2Config(**text))
    base.save_pretrained(root / "base", max_shard_size="500MB")
    toy.perturbed(base, 0.15, 64, seed + 1).save_pretrained(root / "lrm", max_shard_size="500MB")
    base = Qwen2ForCausalLM.from_pretrained(root / "base")
    vlm = toy.vlm_from_base(base, dict(text, rope_theta=10000.0), toy.TINY_VISION, [8, 12, 12],
                            ids)
    toy.perturbed(vlm.model.language_model, 0.05, 16, seed + 2)
    vlm.generation_config.eos_token_id = ids["<|im_end|>"]
    vlm.generation_config.pad_token_id = ids["<|endoftext|>"]
    vlm.save_pretrained(root / "vlm", max_shard_size="500MB")
    toy.make_processor(tok).save_pretrained(root / "vlm")
    (root / "data").mkdir()
    rng = __import__("random").Random(seed)
    with open(root / "data" / "calib.jsonl", "w") as f:
        for i in range(8):
            toy.draw_digit(i, rng).save(root / "data" / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "question": "What number is shown?"}) + "\n")
    return {k: str(root / k) for k in ("base", "lrm", "vlm")} | {
        "data": str(root / "data" / "calib.jsonl")}


def seconds(fn, repeats=3):
    import time
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def interleaved(fns, rounds=7):
    """{name: median seconds}: one call of each function per round, so that a slow spell of the
    machine falls on all of them alike."""
    import statistics
    import time
    times = {name: [] for name in fns}
    for _ in range(rounds + 1):  # the first round warms up
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def layer_seconds(layer, tokens, dense):
    """One gated layer's forward + backward (gradients to the input and the gates) on `tokens`
    tokens: by the low-rank path, or by materialising the Eq. 7 weight for the batch."""
    x = torch.randn(tokens, layer.base.in_features, requires_grad=True)

    def step():
        if dense:
            w = layer.base.weight + layer.lam * (layer.U * layer.effective_S()) @ layer.Vh
            y = F.linear(x, w, layer.base.bias)
        else:
            y = layer(x)
        y.sum().backward()
    return seconds(step)


@pytest.mark.bench
def test_bench_memory_and_speed_on_a_qwen25_05b_shaped_trio(tmp_path):
    import re
    import time
    trio = write_shaped_trio(tmp_path)
    runs = {}
    for name, extra in (("default", ()), ("checkpointing", ("--gradient-checkpointing",))):
        done = cli(trio, tmp_path / name, "--data", trio["data"], "--steps", "3", "--batch-size",
                   "2", "--num-samples", "4", "--max-new-tokens", "8", *extra)
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads((tmp_path / name / "frism_report.json").read_text())
        runs[name]["peak"] = float(re.search(r"peak RSS ([\d.]+) GiB", done.stdout).group(1))
    assert runs["default"]["calibration"]["teacher_cached"]  # auto: 6 visits > 4 answers

    # The same stages, measured bare in this process.
    args = settings(trio, "unused", "--batch-size", "2", "--max-new-tokens", "8")
    model, processor = frism.load_vlm(trio["vlm"], args.dtype, args.device)
    vlm_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    lrm = frism.safetensors_index(trio["lrm"], "--lrm")
    base = frism.safetensors_index(trio["base"], "--base")
    taus = [tau for _, tau in frism.task_vectors(lrm, base, list(frism.decoder_layers(model)))]
    start = time.perf_counter()
    for tau in taus:
        torch.linalg.svd(tau, full_matrices=False)
    bare_svd = time.perf_counter() - start
    del taus
    gated = frism.inject(model, lrm, base, args)
    factors_gib = sum(b.numel() * b.element_size() for l in gated.values()
                      for b in (l.U, l.S, l.Vh)) / 2 ** 30
    items = [frism.Answer(image, q, list(range(100, 108)))
             for image, q in frism.load_calibration(args)[:2]]
    batch, mask = frism.make_batch(processor, items, "cpu")
    with torch.no_grad(), frism.deltas_off(gated):
        teacher = frism.answer_logp(model, batch, mask)

    def uncached():  # the teacher's pass, as train() runs it when nothing is cached
        with torch.no_grad(), frism.deltas_off(gated):
            return frism.answer_logp(model, batch, mask)

    def frism_step(cached, objective=frism.eq10):  # the student's forward/backward, the teacher
        # read from the cache or computed, only if the objective reads it
        step = frism.Step(frism.answer_logp(model, batch, mask), items, batch, mask, gated, args,
                          (lambda: teacher) if cached else uncached)
        objective(step)["loss"].backward()

    def plain_step():  # the unmodified VLM, weights frozen, gradients to activations only
        with frism.deltas_off(gated):
            embed = model.get_input_embeddings()
            hook = embed.register_forward_hook(lambda m, i, o: o.requires_grad_())
            logits = frism.answer_logits(model, batch, mask)
            torch.nn.functional.cross_entropy(logits, batch["input_ids"][
                torch.roll(mask, 1, dims=1)]).backward()
            hook.remove()

    steps = interleaved({"plain": plain_step, "eq10": lambda: frism_step(False),
                         "eq10 cached": lambda: frism_step(True),
                         "entropy": lambda: frism_step(False, frism.entropy)})
    plain, step, cached = steps["plain"], steps["eq10"], steps["eq10 cached"]
    with frism.checkpointing(model):
        recomputed = seconds(lambda: frism_step(True))
    layer = {p.split(".layers.0.")[1]: g for p, g in gated.items() if ".layers.0." in p}
    full = {n: (layer[n].U, layer[n].S, layer[n].Vh) for n in ("self_attn.q_proj", "mlp.up_proj")}
    for g in gated.values():  # the same layers at --rank 128: keep the top 128 subspaces
        k = min(128, len(g.S))
        g.U, g.S, g.Vh = g.U[:, :k].contiguous(), g.S[:k].clone(), g.Vh[:k].contiguous()
        g.g = torch.nn.Parameter(g.g.detach()[:k].clone())
    ranked = seconds(lambda: frism_step(True))
    for name, (U, S, Vh) in full.items():  # back to full rank to compare the two paths
        layer[name].U, layer[name].S, layer[name].Vh = U, S, Vh
        layer[name].g = torch.nn.Parameter(torch.zeros_like(S))
    crossover = {(name, tokens): (layer_seconds(layer[name], tokens, False),
                                  layer_seconds(layer[name], tokens, True))
                 for name in ("self_attn.q_proj", "mlp.up_proj") for tokens in (128, 512, 2048)}

    print(f"\nQwen2.5-0.5B-shaped trio, fp32 on the CPU, {torch.get_num_threads()} threads, "
          f"batch {batch['input_ids'].shape}")
    print(f"  VLM {vlm_gib:.2f} GiB + factors {factors_gib:.2f} GiB = {vlm_gib + factors_gib:.2f} GiB")
    for name, report in runs.items():
        peak, before = report["peak"], report["memory"]["after_stage"]["check"]["peak_rss_gib"]
        print(f"  {name}: whole-run peak RSS {peak:.2f} GiB ({peak / (vlm_gib + factors_gib):.2f}x;"
              f" less the {before:.2f} GiB the process holds before loading anything: "
              f"{(peak - before) / (vlm_gib + factors_gib):.2f}x)")
        print("    stage seconds:", report["seconds"])
        print("    peak RSS (GiB) after each stage:", {k: round(v["peak_rss_gib"], 2) for k, v in
                                                       report["memory"]["after_stage"].items()})
    print(f"  plain forward+backward {plain:.2f} s; training step with the teacher pass "
          f"{step:.2f} s ({step / plain:.2f}x), cached teacher {cached:.2f} s "
          f"({cached / plain:.2f}x), cached + checkpointing {recomputed:.2f} s "
          f"({recomputed / plain:.2f}x), cached at --rank 128 {ranked:.2f} s "
          f"({ranked / plain:.2f}x)")
    print(f"  one step, medians of 7 interleaved rounds: plain {plain:.2f} s; Eq. 10 {step:.2f} s "
          f"uncached, {cached:.2f} s cached; --objective entropy {steps['entropy']:.2f} s (it "
          f"reads no teacher, so the cache does not apply)")
    print(f"  SVD stage {runs['default']['seconds']['svd']:.1f} s vs bare torch.linalg.svd "
          f"{bare_svd:.1f} s: {runs['default']['seconds']['svd'] / bare_svd:.2f}x")
    for (name, tokens), (low_rank, dense) in crossover.items():
        print(f"  one {name} forward+backward, {tokens} tokens: low-rank path {low_rank * 1e3:.0f} "
              f"ms, materialised Eq. 7 weight {dense * 1e3:.0f} ms")
    assert runs["default"]["peak"] > vlm_gib and step > 0 and bare_svd > 0


# ---- files and numbers checked at the boundary; interrupts leave nothing behind --------------

def broken_copy(trio, which, tmp_path, damage):
    import shutil
    path = tmp_path / f"broken-{which}"
    shutil.copytree(trio[which], path)
    damage(path)
    return dict(trio, **{which: str(path)})


def truncate_weights(path):
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(path / "model.safetensors") // 2)


def index_naming_a_missing_shard(path):
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("which", ["lrm", "vlm", "base"])
def test_a_truncated_shard_is_refused_and_nothing_is_written(trio, tmp_path, which):
    broken = broken_copy(trio, which, tmp_path, truncate_weights)
    done = cli(broken, tmp_path / "out", "--no-train")
    assert_refused(done, tmp_path / "out", "re-download")
    assert f"broken-{which}" in done.stderr and "model.safetensors" in done.stderr


def test_a_missing_shard_and_an_unparsable_config_are_refused(trio, tmp_path):
    broken = broken_copy(trio, "lrm", tmp_path, index_naming_a_missing_shard)
    assert_refused(cli(broken, tmp_path / "out", "--no-train"), tmp_path / "out",
                   "model-00002-of-00002.safetensors")
    broken = broken_copy(trio, "base", tmp_path, lambda p: (p / "config.json").write_text("{"))
    assert_refused(cli(broken, tmp_path / "out", "--no-train"), tmp_path / "out", "config")


@pytest.mark.parametrize("flag, value", [("--lam", "nan"), ("--lam", "inf"), ("--lr", "-1"),
                                         ("--lr", "0"), ("--alpha", "inf"), ("--alpha", "-0.1"),
                                         ("--max-pixels", "10"), ("--steps", "0")])
def test_bad_numbers_are_refused_before_any_work(trio, tmp_path, flag, value):
    done = cli(trio, tmp_path / "out", "--data", trio["data"], flag, value)
    assert_refused(done, tmp_path / "out", flag)


def interrupt(trio, tmp_path, stage, *extra, sig=None):
    """Run frism.py in a subprocess that pauses inside `stage`, send it a real signal there."""
    import signal
    import time
    mark = tmp_path / "reached"
    code = "\n".join([
        "import signal, sys, time, frism, transformers",
        # as in a terminal, even where the tests run as a background job (which ignores SIGINT)
        "signal.signal(signal.SIGINT, signal.default_int_handler)",
        f"def pause(): open({str(mark)!r}, 'w').close(); time.sleep(120)",
        "if sys.argv[1] == 'svd':",
        "    real_svd = frism.decompose",
        "    frism.decompose = lambda *a: (pause(), real_svd(*a))[1]",
        "if sys.argv[1] == 'train':",
        "    real_inject = frism.inject_loss",
        "    frism.inject_loss = lambda *a: (pause(), real_inject(*a))[1]",
        "if sys.argv[1] == 'save':",
        "    real_save = transformers.PreTrainedModel.save_pretrained",
        "    def slow_save(self, *a, **k): real_save(self, *a, **k); pause()",
        "    transformers.PreTrainedModel.save_pretrained = slow_save",
        "sys.exit(frism.main(sys.argv[2:]))"])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, stage, "--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base",
         trio["base"], "--out", str(out), "--data", trio["data"], "--max-new-tokens", "4",
         "--steps", "2", *extra], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    deadline = time.time() + 120
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert mark.exists(), proc.communicate()[1]
    proc.send_signal(sig or signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, stderr, out


@pytest.mark.parametrize("stage", ["svd", "train", "save"])
def test_an_interrupt_anywhere_leaves_no_output_and_no_partial_directory(trio, tmp_path, stage):
    code, stderr, out = interrupt(trio, tmp_path, stage)
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("frism.py: interrupted")
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_a_killed_overwrite_keeps_the_previous_output(trio, tmp_path):
    import signal
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the previous model")
    code, stderr, _ = interrupt(trio, tmp_path, "save", "--overwrite", sig=signal.SIGTERM)
    assert code == 130 and "Traceback" not in stderr
    assert os.listdir(out) == ["keep.txt"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(trio, tmp_path):
    code = "\n".join([
        "import errno, os, sys, frism, transformers",
        "def full(self, *a, **k): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))",
        "transformers.PreTrainedModel.save_pretrained = full",
        "sys.exit(frism.main(sys.argv[1:]))"])
    done = subprocess.run([sys.executable, "-c", code, "--vlm", trio["vlm"], "--lrm", trio["lrm"],
                           "--base", trio["base"], "--out", str(tmp_path / "out"), "--no-train"],
                          cwd=HERE, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "No space left on device" in done.stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path) == []


# ---- other model families: what is matched, what is refused ----------------------------------

def a_checkpoint(path, names):
    from safetensors.torch import save_file
    path.mkdir()
    (path / "config.json").write_text("{}")
    save_file({name: torch.zeros(2, 2) for name in names}, str(path / "model.safetensors"))
    return str(path)


def test_only_the_language_models_tensors_are_matched(tmp_path):
    """Gemma 3's multimodal base, SmolVLM, LLaVA-OneVision: the vision tower's layers have the
    same inner names as the decoder's, and must never be taken for them."""
    path = a_checkpoint(tmp_path / "gemma-like", [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.visual.blocks.0.attn.qkv.weight"])
    index = frism.safetensors_index(path, "--base")
    assert list(index) == ["layers.0.self_attn.q_proj"]
    assert index["layers.0.self_attn.q_proj"][1].startswith("language_model.")


def test_two_tensors_claiming_one_decoder_path_are_refused(tmp_path):
    path = a_checkpoint(tmp_path / "ambiguous", ["model.layers.0.mlp.up_proj.weight",
                                                 "text.model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(frism.InputError, match="two tensors claim .*layers.0.mlp.up_proj"):
        frism.safetensors_index(path, "--lrm")


@pytest.mark.parametrize("field, value, words", [
    ("num_local_experts", 8, "mixture-of-experts"), ("num_experts", 64, "mixture-of-experts"),
    ("cross_attention_layers", [1], "cross-attention"), ("hidden_act", "gelu", "activation")])
def test_decoders_that_do_not_line_up_are_refused(trio, field, value, words):
    from transformers import AutoConfig
    vlm = frism.language_config(frism.load_config(trio["vlm"], "--vlm"))
    other = AutoConfig.from_pretrained(trio["lrm"])
    setattr(other, field, value)
    with pytest.raises(frism.InputError, match=words):
        frism.check_configs(vlm, {"--lrm": other})


def test_a_batch_of_images_of_different_sizes_is_one_processor_call(trio):
    from PIL import Image
    _, processor, _, args = merged_model(trio)
    items = [frism.Answer(Image.new("RGB", (56, 56)), "What?", [100, 101]),
             frism.Answer(Image.new("RGB", (140, 84)), "And this one?", [102, 103, 104])]
    batch, mask = frism.make_batch(processor, items, "cpu")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 10]]
    for b, answer in enumerate(([100, 101], [102, 103, 104])):
        positions = mask[b].nonzero().flatten()
        assert batch["input_ids"][b, positions + 1].tolist() == answer
    image_tokens = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(
        "<|image_pad|>")).sum(1).tolist()
    assert image_tokens == [4, 15]  # the processor's own count, per image


# ---- the fork promise: another objective, another parameter, in one place each ---------------

def test_a_replacement_objective_changes_the_gates_and_moves_only_the_gated_parameters(trio):
    runs = {}
    for name, objective in (("eq10", frism.eq10), ("fork", lambda step: {"loss": -sum(
            layer.g.sum() for layer in step.gated.values())})):  # any other function of a step
        model, processor, gated, args = merged_model(trio, "--steps", "3")
        frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".g")}
        history, teacher = train(model, processor, gated, args, objective)
        after = model.state_dict()
        assert all(torch.equal(frozen[k], after[k]) for k in frozen)
        runs[name] = torch.cat([layer.g.detach().flatten() for layer in gated.values()])
    assert not torch.allclose(runs["eq10"], runs["fork"])
    assert torch.all(runs["fork"] > 0)  # the fork's objective pushes every gate up
    assert set(history[-1]) == {"step", "loss", "mean_gate"}  # the terms it names, no KL
    assert teacher.passes == 0  # it never read the teacher


def test_eq10_is_the_kl_plus_alpha_times_eq9_and_names_its_terms(trio):
    model, processor, gated, args = merged_model(trio, "--alpha", "0.3")
    batch, mask = a_batch(trio, processor, args)
    student, teacher = student_and_teacher(model, gated, batch, mask)
    step = frism.Step(student, [], batch, mask, gated, args, lambda: teacher)
    terms = frism.eq10(step)
    kl, L_inject = frism.distill_loss(student, teacher), frism.inject_loss(gated)
    assert set(terms) == {"loss", "kl", "injected"}
    torch.testing.assert_close(terms["loss"], kl + 0.3 * L_inject)
    torch.testing.assert_close(terms["injected"], -L_inject)


def test_the_entropy_objective_is_the_mean_answer_entropy_plus_alpha_times_eq9(trio):
    model, processor, gated, args = merged_model(trio, "--alpha", "0.3")
    batch, mask = a_batch(trio, processor, args)
    with torch.no_grad():
        p = F.softmax(model(**batch).logits[mask].double(), -1)
    expected = -(p * p.log()).sum(-1).mean()  # mean over the answer tokens of the batch
    step = frism.Step(frism.answer_logp(model, batch, mask), [], batch, mask, gated, args,
                      lambda: pytest.fail("the entropy objective read the teacher"))
    terms = frism.entropy(step)
    assert set(terms) == {"loss", "entropy", "injected"}
    torch.testing.assert_close(terms["entropy"].double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["entropy"] + 0.3 * frism.inject_loss(gated))


def test_the_teacher_runs_only_for_an_objective_that_reads_it(trio):
    """Eq. 10 reads the teacher: a pass a step, or each answer once when cached. The entropy
    objective never does: no pass, no cache, even with --cache-teacher."""
    for objective, extra, passes, cached in (("eq10", "no", lambda n: 3, False),
                                             ("eq10", "yes", lambda n: math.ceil(n / 4), True),
                                             ("entropy", "yes", lambda n: 0, False)):
        model, processor, gated, args = merged_model(trio, "--steps", "3", "--objective",
                                                     objective, "--cache-teacher", extra)
        history, teacher = train(model, processor, gated, args, frism.OBJECTIVES[objective].function)
        assert teacher.passes == passes(len(teacher.answers)), (objective, extra)
        assert (teacher.kept is not None) == cached
        assert ("kl" in history[0]) == (objective == "eq10")
        assert ("entropy" in history[0]) == (objective == "entropy")


def test_a_new_objective_is_one_function_and_one_row_of_the_table(trio, tmp_path, monkeypatch):
    def confidence(step):  # what a fork writes: any function of the step
        logp = step.student_logp
        return {"loss": -logp.exp().max(-1).values.mean(), "confidence": logp.exp().max(-1).values.mean()}
    monkeypatch.setitem(frism.OBJECTIVES, "confidence", frism.Objective(
        confidence, "the merged model's top probability at the answer positions", "a fork"))
    out = tmp_path / "confident"
    assert frism.main(["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"],
                       "--data", trio["data"], "--steps", "2", "--max-new-tokens", "6",
                       "--objective", "confidence", "--out", str(out)]) == 0
    report = json.loads((out / "frism_report.json").read_text())
    assert report["objective"].startswith("confidence: the merged model's top probability")
    assert set(report["loss_curve"][0]) == {"step", "loss", "confidence", "mean_gate"}
    assert report["calibration"]["teacher_passes"] == 0
    assert "| objective | confidence:" in (out / "README.md").read_text()


def test_the_objective_is_named_in_the_report_and_the_model_card(trio, tmp_path):
    done = cli(trio, tmp_path / "entropy", "--data", trio["data"], "--steps", "2",
               "--max-new-tokens", "6", "--objective", "entropy")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "entropy" / "frism_report.json").read_text())
    assert report["objective"].startswith("entropy: ") and "AdaRank" in report["objective"]
    assert set(report["loss_curve"][-1]) == {"step", "loss", "entropy", "injected", "mean_gate"}
    card = (tmp_path / "entropy" / "README.md").read_text()
    assert "| objective | entropy: " in card and "entropy " in card.split("terms at the last")[1]
    assert "kl" not in card.split("terms at the last")[1]


def test_the_objective_factory_receives_everything_the_run_has(trio, tmp_path):
    seen = {}

    def make_objective(model, processor, gated, answers, args):
        seen.update(model=model, processor=processor, gated=gated, answers=answers, args=args)
        return frism.eq10
    out = tmp_path / "factory"
    assert frism.main(["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"],
                       "--data", trio["data"], "--steps", "1", "--max-new-tokens", "6",
                       "--lam", "0.7", "--out", str(out)], make_objective=make_objective) == 0
    assert type(seen["model"]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert hasattr(seen["processor"], "image_processor")
    assert len(seen["gated"]) == 14 and all(isinstance(layer, frism.GatedLinear)
                                           for layer in seen["gated"].values())
    stop = seen["processor"].tokenizer.eos_token_id
    assert seen["answers"] and all(isinstance(a, frism.Answer) and (a.ids[-1] == stop or
                                   len(a.ids) == 6) for a in seen["answers"])
    assert seen["args"].lam == 0.7 and seen["args"].steps == 1
    report = json.loads((out / "frism_report.json").read_text())
    assert report["objective"].endswith("make_objective (given by the caller)")


def test_gated_linear_freezes_the_layer_it_wraps_whoever_calls_inject(trio):
    """A model loaded by hand, with every weight trainable: inject still trains and saves only
    the gates."""
    args = settings(trio, "unused", "--steps", "2", "--lr", "0.5")
    model = AutoModelForImageTextToText.from_pretrained(trio["vlm"])  # nothing frozen
    processor = AutoProcessor.from_pretrained(trio["vlm"])
    assert all(p.requires_grad for p in model.parameters())
    gated = frism.inject(model, frism.safetensors_index(trio["lrm"], "--lrm"),
                         frism.safetensors_index(trio["base"], "--base"), args)
    assert all(not p.requires_grad for layer in gated.values() for p in layer.base.parameters())
    assert set(frism.trained_parameters(gated)) == {f"{path}.g" for path in gated}
    wrapped = {path: layer.base.weight.clone() for path, layer in gated.items()}
    train(model, processor, gated, args)
    assert all(torch.equal(layer.base.weight, wrapped[path]) for path, layer in gated.items())


def test_the_program_runs_the_method_as_subspace_merge(trio, frism_run):
    """frism.py's output is subspace_merge's fold: the same settings, called as a function."""
    args = settings(trio, "unused", "--steps", "4", "--lam", "0.9", "--rank", "40")
    model, processor = frism.load_vlm(trio["vlm"], args.dtype, args.device)
    trained, record = frism.subspace_merge(
        model, processor, frism.safetensors_index(trio["lrm"], "--lrm"),
        frism.safetensors_index(trio["base"], "--base"), frism.load_calibration(args), args)
    assert not any(isinstance(m, frism.GatedLinear) for m in model.modules())  # folded
    assert len(record["loss_curve"]) == 4 and set(trained) == set(load_file(
        frism_run / "frism_gates.safetensors"))
    on_disk = tensors(frism_run)
    for key, value in model.state_dict().items():
        if frism.DECODER_PATH.search(key):
            torch.testing.assert_close(on_disk[key.replace("model.language_model.", "model.")],
                                       value)


class ScaledGatedLinear(frism.GatedLinear):
    """What a fork adds: one learned scale per layer on top of the gates."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def effective_S(self):
        return super().effective_S() * self.scale


def test_a_parameter_a_fork_adds_to_the_gated_layer_trains_and_is_saved(trio, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(frism, "GatedLinear", ScaledGatedLinear)
    out = tmp_path / "fork"
    assert frism.main(["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"],
                       "--out", str(out), "--data", trio["data"], "--steps", "3",
                       "--max-new-tokens", "6", "--lam", "0.9"]) == 0
    saved = load_file(out / "frism_gates.safetensors")
    scales = {k: v for k, v in saved.items() if k.endswith(".scale")}
    assert len(scales) == 14 and len(saved) == 28  # a scale and a gate vector per layer
    assert all(v.item() != 1.0 for v in scales.values())  # trained
    vlm, merged = tensors(trio["vlm"]), tensors(out)
    key = "model.language_model.layers.0.mlp.up_proj"
    U, S, Vh = torch.linalg.svd(task_vector(trio, "layers.0.mlp.up_proj"), full_matrices=False)
    expected = vlm["model.layers.0.mlp.up_proj.weight"] + 0.9 * (
        U * (torch.sigmoid(saved[key + ".g"]) * S * saved[key + ".scale"])) @ Vh
    torch.testing.assert_close(merged["model.layers.0.mlp.up_proj.weight"], expected,
                               atol=1e-5, rtol=1e-4)  # the fold used the trained scale


# ---- the first run on a GPU: data id, lambda scan, model card, no hidden leftovers -----------

def test_the_default_calibration_set_is_vizwiz_at_its_current_hub_id():
    assert frism.parse_args(["--vlm", "a/b", "--lrm", "c/d", "--base", "e/f"]).data == \
        "lmms-lab-encoder/VizWiz-VQA"


def test_the_lambda_scan_is_eq8_with_every_gate_open_at_each_lambda(trio):
    model, processor, gated, args = merged_model(trio)
    answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
    table = frism.lambda_scan(model, processor, gated, answers, [1.0, 0.0, 0.5], 3)
    assert [row["lam"] for row in table] == [0.0, 0.5, 1.0]  # sorted
    assert table[0]["kl"] == 0.0 and table[0]["rise"] is None  # lambda 0 is the VLM itself
    for row, previous in zip(table[1:], table):
        assert row["kl"] > previous["kl"] and row["rise"] == pytest.approx(
            row["kl"] - previous["kl"])
    for layer in gated.values():  # directly: every gate open at 0.5, one batch of every answer
        layer.g.data.fill_(math.inf)
        layer.lam = 0.5
    batch, mask = frism.make_batch(processor, answers, args.device)
    with torch.no_grad():
        kl = frism.distill_loss(*student_and_teacher(model, gated, batch, mask)).item()
    assert table[1]["kl"] == pytest.approx(kl, rel=1e-4)


def test_the_scan_prints_the_table_and_writes_only_the_report(trio, tmp_path):
    out = tmp_path / "scan"
    done = cli(trio, out, "--data", trio["data"], "--max-new-tokens", "6", "--scan", "0.5", "0",
               "1")
    assert done.returncode == 0, done.stderr
    assert "Lambda scan" in done.stdout and "--lam" in done.stdout
    assert os.listdir(out) == ["frism_report.json"]  # no model
    scan = json.loads((out / "frism_report.json").read_text())["scan"]
    assert [row["lam"] for row in scan] == [0.0, 0.5, 1.0]
    assert 0 == scan[0]["kl"] < scan[1]["kl"] < scan[2]["kl"]
    assert cli(trio, tmp_path / "x", "--scan", "nan").returncode == 2


def assert_card(path, vlm, lrm, tag, words):
    from huggingface_hub import ModelCard
    card = ModelCard.load(os.path.join(path, "README.md"))
    assert card.data.base_model == [vlm, lrm]
    assert "merge" in card.data.tags and tag in card.data.tags
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text"
    for word in words:
        assert word in card.text, word


def test_every_frism_output_has_a_model_card_the_hub_reads(trio, frism_run):
    assert_card(frism_run, trio["vlm"], trio["lrm"], "frism", [
        "2601.21187", "python frism.py --vlm", "--lam 0.9", "| lambda (--lam) | 0.9 |",
        "| steps | 4 |", trio["data"], "14 gated layers", "Injected spectral energy",
        "transformers", "torch"])


def test_a_task_arithmetic_output_has_a_model_card_too(trio, tmp_path):
    assert cli(trio, tmp_path / "ta", "--no-train", "--lam", "0.5").returncode == 0
    assert_card(tmp_path / "ta", trio["vlm"], trio["lrm"], "frism", [
        "Task Arithmetic", "W = W_vlm + 0.5 * tau", "none (--no-train)"])


def test_a_hard_kill_while_saving_leaves_nothing_hidden_after_the_next_run(trio, tmp_path):
    import signal
    code, _, out = interrupt(trio, tmp_path, "save", sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]
    assert len(left) == 1 and not out.exists()  # what SIGKILL leaves: nothing can clean it up
    live = tmp_path / f".out.partial-{os.getpid()}@{__import__('socket').gethostname()}-live1234"
    live.mkdir()  # a live run's (this test process's): never touched
    done = cli(trio, out, "--no-train")
    assert done.returncode == 0, done.stderr
    assert f"removed 1 staging directory left beside --out by a killed run: {left[0]}" in \
        done.stderr
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == [live.name]
    assert (out / "model.safetensors").exists()


def test_a_killed_replacement_puts_the_previous_output_back(tmp_path):
    import socket
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    old = tmp_path / f".out.replaced-{dead}@{socket.gethostname()}-abcd1234"
    (old / "out").mkdir(parents=True)
    (old / "out" / "keep.txt").write_text("the previous model")
    other = tmp_path / f".out.partial-{dead}@another-host-abcd1234"
    other.mkdir()  # another machine's (a shared disk): its processes cannot be seen from here
    removed = frism.remove_stale_staging(str(tmp_path / "out"), "frism.py")
    assert removed and (tmp_path / "out" / "keep.txt").read_text() == "the previous model"
    assert not old.exists() and other.exists()
