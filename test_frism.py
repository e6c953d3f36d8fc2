"""Each test states one property of FRISM, on a tiny trio of the real Hugging Face classes."""
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
from typing import NamedTuple

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


@pytest.mark.layer
def test_only_the_gates_receive_gradients(trio):
    """Only what the gated layers add (FRISM: the gates g, one a direction) gets a gradient."""
    model, processor, gated, args = merged_model(trio)
    batch, mask = a_batch(trio, processor, args)
    loss = frism.distill_loss(*student_and_teacher(model, gated, batch, mask)) + \
        frism.inject_loss(gated)
    loss.backward()
    added = {id(p) for p in frism.trained_parameters(gated).values()}
    assert {id(layer.g) for layer in gated.values()} <= added
    for name, p in model.named_parameters():
        if id(p) in added:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def frozen_weights(model, gated):
    """Every tensor of the model but those the gated layers add, as it is now."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if k not in frism.trained_parameters(gated)}


@pytest.mark.layer
def test_training_leaves_every_other_weight_untouched(trio):
    model, processor, gated, args = merged_model(trio, "--steps", "3")
    frozen = frozen_weights(model, gated)
    train(model, processor, gated, args)
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # vision, embeddings, lm_head...
    assert any(not torch.equal(l.g, torch.zeros_like(l.g)) for l in gated.values())


@pytest.mark.parametrize("alpha, direction", [(0.0, -1), (50.0, +1)])
def test_gates_fall_without_inject_and_rise_with_it(trio, alpha, direction):
    model, processor, gated, args = merged_model(trio, "--steps", "30", "--lr", "0.2",
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

class Ran(NamedTuple):
    """What a run of a program left: its exit code and what it printed."""
    returncode: int
    stdout: str
    stderr: str


def run_main(main, argv):
    """A program's main(argv) in this process, as its command line would run it (starting an
    interpreter costs more than most of these runs): its exit code and what it printed. The
    command line itself, `python frism.py ...`, runs in a process of its own in frism_run."""
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)  # guarded() sets its own handler
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's --help and usage errors
                code = e.code if isinstance(e.code, int) else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return Ran(code, out.getvalue(), err.getvalue())


def cli(trio, out, *extra):
    return run_main(frism.main, ["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base",
                                 trio["base"], "--out", str(out), *extra])


@pytest.fixture(scope="module")
def frism_run(trio, tmp_path_factory):
    """`python frism.py ...` itself, in a process of its own."""
    out = tmp_path_factory.mktemp("cli") / "merged"
    cmd = [sys.executable, os.path.join(HERE, "frism.py"), "--vlm", trio["vlm"], "--lrm",
           trio["lrm"], "--base", trio["base"], "--out", str(out), "--data", trio["data"],
           "--steps", "4", "--lam", "0.9", "--max-new-tokens", "6", "--rank", "40"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
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


@pytest.mark.layer
def test_cli_weights_follow_eq7_with_an_independent_svd_and_the_saved_gates(trio, frism_run):
    """W = W_vlm + lam U diag(gate * S) Vh, with the gate of every direction as the run saved
    it (gates/values.safetensors: S_eff / S, FRISM's sigmoid(g))."""
    vlm, merged = tensors(trio["vlm"]), tensors(frism_run)
    gates = load_file(os.path.join(frism_run, frism.GATE_VALUES))
    params = load_file(os.path.join(frism_run, frism.GATE_PARAMETERS))
    assert len(gates) == 14 and {f"{path}.g" for path in gates} <= set(params)
    for key, gate in gates.items():
        name = key.split("language_model.", 1)[1]
        U, S, Vh = torch.linalg.svd(task_vector(trio, name), full_matrices=False)
        k = min(40, len(S))  # k_proj and v_proj have only 32 directions
        assert gate.shape == params[f"{key}.g"].shape == (k,)
        expected = vlm["model." + name + ".weight"] + 0.9 * (
            U[:, :k] * (gate * S[:k])) @ Vh[:k]
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
    gates = load_file(tmp_path / "ta" / frism.GATE_PARAMETERS)
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
    ("frism", ["--text-data", "{data}"], "refused", "--text-data has no effect with --objective eq10"),
    ("frism", ["--objective", "entropy", "--beta", "0.5"], "refused",
     "--beta has no effect with --objective entropy"),
    ("frism", ["--data", "{data}", "--data-split", "train"], "refused",
     "--data-split has no effect with a .jsonl --data"),
    ("frism", ["--objective", "dual", "--text-data", "{data}", "--text-split", "test"], "refused",
     "--text-split has no effect with a .jsonl --text-data"),
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
    groups = frism.TRAINING + frism.DATA + frism.TEXT + ("lam", "seed")
    for dest, by, _ in frism.VOIDED:
        if dest not in groups:
            assert any({frism.flag_name(dest), frism.flag_name(by)} <= c for c in cases), dest
    for dest, needs, _ in frism.VOIDED_UNLESS:
        assert any(frism.flag_name(dest) in c and frism.flag_name(needs) not in c
                   for c in cases), dest
    assert any(frism.flag_name(frism.TEXT[0]) in c for c in cases)  # the text stream's flags


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
    from miniature import world
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    tok = world.make_tokenizer(["0123456789"], vocab_size=263)
    ids = world.special_ids(tok)
    text = dict(vocab_size=len(tok), hidden_size=896, intermediate_size=4864,
                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"])
    base = Qwen2ForCausalLM(Qwen2Config(**text))
    base.save_pretrained(root / "base", max_shard_size="500MB")
    world.perturbed(base, 0.15, 64, seed + 1).save_pretrained(root / "lrm", max_shard_size="500MB")
    base = Qwen2ForCausalLM.from_pretrained(root / "base")
    vlm = world.vlm_from_base(base, dict(text, rope_theta=10000.0), world.TINY_VISION, [8, 12, 12],
                            ids)
    world.perturbed(vlm.model.language_model, 0.05, 16, seed + 2)
    vlm.generation_config.eos_token_id = ids["<|im_end|>"]
    vlm.generation_config.pad_token_id = ids["<|endoftext|>"]
    vlm.save_pretrained(root / "vlm", max_shard_size="500MB")
    world.make_processor(tok).save_pretrained(root / "vlm")
    (root / "data").mkdir()
    rng = __import__("random").Random(seed)
    with open(root / "data" / "calib.jsonl", "w") as f:
        for i in range(8):
            world.draw_digit(i, rng, hard=False).save(root / "data" / f"{i}.png")
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
        # `python frism.py ...` in a fresh process each: its peak holds nothing of the build above
        # or of the other run, and its baseline is what that process holds after the checks
        done = subprocess.run([sys.executable, os.path.join(HERE, "frism.py"), "--vlm", trio["vlm"],
                               "--lrm", trio["lrm"], "--base", trio["base"], "--out",
                               str(tmp_path / name), "--data", trio["data"], "--steps", "3",
                               "--batch-size", "2", "--num-samples", "4", "--max-new-tokens", "8",
                               *extra], capture_output=True, text=True, env=dict(
                                   os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
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

    # the text stream of --objective dual: two text prompts with 8-token answers, the LRM's top-64
    # log-probs kept (as the run keeps them: the LRM is gone when training starts)
    text_items = [frism.Answer(None, "What is 17 times 23? Think step by step.",
                               list(range(200, 208))) for _ in range(2)]
    vocab = model.get_output_embeddings().weight.shape[0]
    text_lrm = frism.top(torch.randn(16, vocab).log_softmax(-1), frism.TEXT_TOP_K)
    args.beta = 1.0

    def read_text():
        text_batch, text_mask = frism.make_batch(processor, text_items, "cpu")
        return frism.answer_logp(model, text_batch, text_mask), text_lrm

    def frism_step(cached, objective=frism.eq10):  # the student's forward/backward, the teacher
        # read from the cache or computed, only if the objective reads it
        step = frism.Step(frism.answer_logp(model, batch, mask), items, batch, mask, gated, args,
                          (lambda: teacher) if cached else uncached, read_text)
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
                         "entropy": lambda: frism_step(False, frism.entropy),
                         "dual": lambda: frism_step(False, frism.dual),
                         "dual cached": lambda: frism_step(True, frism.dual)})
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
        print(f"  {name} (`python frism.py`, a fresh process): whole-run peak RSS {peak:.2f} GiB "
              f"({peak / (vlm_gib + factors_gib):.2f}x; less the {before:.2f} GiB that process "
              f"holds after its checks, before any weight is read: "
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
          f"reads no teacher, so the cache does not apply); --objective dual "
          f"{steps['dual']:.2f} s uncached, {steps['dual cached']:.2f} s cached (one text "
          f"micro-batch of 2 prompts and 8-token answers more a step)")
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
    mark = tmp_path / "reached"
    program = "\n".join([
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
    code, _, stderr = signalled_when_marked(
        [sys.executable, "-c", program, stage, "--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base",
         trio["base"], "--out", str(out), "--data", trio["data"], "--max-new-tokens", "4",
         "--steps", "2", *extra], mark, sig or signal.SIGINT)
    return code, stderr, out


def signalled_when_marked(command, mark, sig):
    """Run `command` in a process of its own and send it `sig` once it has created the file
    `mark` (it pauses there): (its exit code, stdout, stderr)."""
    import time
    proc = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                HF_DATASETS_OFFLINE="1"))
    deadline = time.time() + 120
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert mark.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


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

@pytest.mark.layer
def test_a_replacement_objective_changes_the_gates_and_moves_only_the_gated_parameters(trio):
    runs = {}
    for name, objective in (("eq10", frism.eq10), ("fork", lambda step: {"loss": -sum(
            layer.g.sum() for layer in step.gated.values())})):  # any other function of a step
        model, processor, gated, args = merged_model(trio, "--steps", "3")
        frozen = frozen_weights(model, gated)
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


@pytest.mark.layer
def test_gated_linear_freezes_the_layer_it_wraps_whoever_calls_inject(trio):
    """A model loaded by hand, with every weight trainable: inject still trains and saves only
    what the gated layers add (FRISM: the gates), never a weight of the layers they wrap."""
    args = settings(trio, "unused", "--steps", "2", "--lr", "0.5")
    model = AutoModelForImageTextToText.from_pretrained(trio["vlm"])  # nothing frozen
    processor = AutoProcessor.from_pretrained(trio["vlm"])
    assert all(p.requires_grad for p in model.parameters())
    gated = frism.inject(model, frism.safetensors_index(trio["lrm"], "--lrm"),
                         frism.safetensors_index(trio["base"], "--base"), args)
    assert all(not p.requires_grad for layer in gated.values() for p in layer.base.parameters())
    trained = frism.trained_parameters(gated)
    assert {f"{path}.g" for path in gated} <= set(trained)
    wrapped_ids = {id(p) for layer in gated.values() for p in layer.base.parameters()}
    assert not any(id(p) in wrapped_ids for p in trained.values())
    assert set(trained) == {f"{path}.{name}" for path, layer in gated.items()
                            for name, _ in layer.named_parameters()} - {
        f"{path}.base.{name}" for path, layer in gated.items()
        for name, _ in layer.base.named_parameters()}  # all the layer adds
    wrapped = {path: layer.base.weight.clone() for path, layer in gated.items()}
    train(model, processor, gated, args)
    assert all(torch.equal(layer.base.weight, wrapped[path]) for path, layer in gated.items())


@pytest.mark.layer
def test_the_program_runs_the_method_as_subspace_merge(trio, frism_run):
    """frism.py's output is subspace_merge's fold: the same settings, called as a function."""
    args = settings(trio, "unused", "--steps", "4", "--lam", "0.9", "--rank", "40")
    model, processor = frism.load_vlm(trio["vlm"], args.dtype, args.device)
    trained, gates, record = frism.subspace_merge(
        model, processor, frism.safetensors_index(trio["lrm"], "--lrm"),
        frism.safetensors_index(trio["base"], "--base"), frism.load_calibration(args), args)
    assert not any(isinstance(m, frism.GatedLinear) for m in model.modules())  # folded
    assert len(record["loss_curve"]) == 4 and set(trained) == set(load_file(
        frism_run / frism.GATE_PARAMETERS))
    saved = load_file(frism_run / frism.GATE_VALUES)
    assert set(gates) == set(saved) and all(torch.equal(gates[k], saved[k]) for k in saved)
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


@pytest.mark.layer
def test_a_parameter_a_fork_adds_to_the_gated_layer_trains_and_is_saved(trio, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(frism, "GatedLinear", ScaledGatedLinear)
    out = tmp_path / "fork"
    assert frism.main(["--vlm", trio["vlm"], "--lrm", trio["lrm"], "--base", trio["base"],
                       "--out", str(out), "--data", trio["data"], "--steps", "3",
                       "--max-new-tokens", "6", "--lam", "0.9"]) == 0
    saved = load_file(out / frism.GATE_PARAMETERS)
    scales = {k: v for k, v in saved.items() if k.endswith(".scale")}
    assert len(scales) == 14 and {k.removesuffix(".scale") + ".g" for k in scales} <= set(saved)
    assert all(v.item() != 1.0 for v in scales.values())  # trained
    vlm, merged = tensors(trio["vlm"]), tensors(out)
    key = "model.language_model.layers.0.mlp.up_proj"
    gate = load_file(out / frism.GATE_VALUES)[key]  # the layer's own: S_eff / S
    assert not torch.allclose(gate, torch.sigmoid(saved[key + ".g"]))  # the scale takes part
    U, S, Vh = torch.linalg.svd(task_vector(trio, "layers.0.mlp.up_proj"), full_matrices=False)
    expected = vlm["model.layers.0.mlp.up_proj.weight"] + 0.9 * (U * (gate * S)) @ Vh
    torch.testing.assert_close(merged["model.layers.0.mlp.up_proj.weight"], expected,
                               atol=1e-5, rtol=1e-4)  # the fold used the trained scale
    report = json.loads((out / "frism_report.json").read_text())
    stats = report["gates"][key]  # the report's figures are the layer's own gates too
    assert stats["mean"] == pytest.approx(gate.mean().item(), rel=1e-5)
    assert report["loss_curve"][-1]["mean_gate"] == pytest.approx(torch.cat(
        list(load_file(out / frism.GATE_VALUES).values())).mean().item(), rel=1e-5)


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
    assert_card(tmp_path / "ta", trio["vlm"], trio["lrm"], "ta", [  # tagged with what made it
        "Task Arithmetic", "W = W_vlm + 0.5 * tau", "none (--no-train)"])
    from huggingface_hub import ModelCard
    assert "frism" not in ModelCard.load(tmp_path / "ta" / "README.md").data.tags


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


# ---- the text stream and the dual objective (ours): the LRM answers text prompts -------------

@pytest.fixture(scope="module")
def text_prompts(tmp_path_factory):
    """Unlabelled text prompts, a .jsonl of {"question": text} lines."""
    path = tmp_path_factory.mktemp("text") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"What number is shown? {d}"}) + "\n"
                            for d in range(6)))
    return str(path)


def dual_settings(trio, text_prompts, *extra):
    return settings(trio, "unused", "--objective", "dual", "--text-data", text_prompts, *extra)


def test_text_prompts_are_read_with_the_vlms_chat_template_and_no_image(trio):
    model, processor, gated, args = merged_model(trio)
    items = [frism.Answer(None, "What is 2 + 3?", [100, 101]),
             frism.Answer(None, "Add five.", [102, 103, 104])]
    batch, mask = frism.make_batch(processor, items, args.device)
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not (batch["input_ids"] == image_pad).any()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]}],
        tokenize=False, add_generation_prompt=True)
    n = len(processor.tokenizer(prompt).input_ids)
    assert batch["input_ids"][0, :n].tolist() == processor.tokenizer(prompt).input_ids
    # the mask marks the positions that predict each answer token, and nothing else
    targets = batch["input_ids"].roll(-1, dims=1)[mask].tolist()
    assert targets == [100, 101, 102, 103, 104]


def test_the_lrm_answers_with_its_own_template_and_its_top_log_probs_are_kept(trio,
                                                                              text_prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = dual_settings(trio, text_prompts, "--text-max-new-tokens", "5")
    lrm = AutoModelForCausalLM.from_pretrained(trio["lrm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(trio["lrm"])
    prompts = frism.load_text_prompts(args)
    stream = frism.lrm_answers(lrm, tokenizer, prompts, set(), args)
    stop = frism.end_of_turn_ids(lrm, tokenizer)
    assert isinstance(stream, frism.TextStream) and stream.items
    assert [item.question for item in stream.items] == prompts[:len(stream.items)]
    k = min(frism.TEXT_TOP_K, lrm.config.vocab_size - 1)
    for item, kept in zip(stream.items, stream.lrm):
        assert item.image is None and 0 < len(item.ids) <= 5 and not set(item.ids) & stop
        template = tokenizer.apply_chat_template([{"role": "user", "content": item.question}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = tokenizer(template, add_special_tokens=False).input_ids + item.ids
        with torch.no_grad():
            expected = F.log_softmax(lrm(torch.tensor([ids])).logits[0].float(), -1)
        at_answer = expected[-len(item.ids) - 1:-1]
        top, where = at_answer.topk(k, dim=-1)
        torch.testing.assert_close(kept.logp, top, atol=1e-5, rtol=1e-4)
        assert torch.equal(kept.ids, where)
        rest = at_answer.scatter(-1, where, -math.inf).logsumexp(-1)
        torch.testing.assert_close(kept.rest, rest, atol=1e-5, rtol=1e-4)
        assert at_answer.argmax(-1).tolist() == item.ids  # its own greedy answer
    # a token the VLM reads as another ends an answer where the LRM first emits it
    ids = stream.items[0].ids
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])
    cut = frism.lrm_answers(lrm, tokenizer, [stream.items[0].question], {ids[k]}, args)
    assert cut.items[0].ids == ids[:k]
    # one that opens it (an R1 model's <think>) stays in the LRM's context, out of the answer
    rest = ids[1:ids.index(ids[0], 1)] if ids[0] in ids[1:] else ids[1:]
    opened = frism.lrm_answers(lrm, tokenizer, [stream.items[0].question], {ids[0]}, args)
    assert opened.items[0].ids == rest
    torch.testing.assert_close(opened.lrm[0].logp, stream.lrm[0].logp[1:1 + len(rest)])


def test_the_lrm_is_released_before_the_vlm_loads(trio, text_prompts, tmp_path, monkeypatch):
    import gc
    import weakref
    seen = {}
    real_answers, real_load = frism.lrm_answers, frism.load_vlm

    def answers(lrm, *a):
        seen["lrm"] = weakref.ref(lrm)
        return real_answers(lrm, *a)

    def load_vlm(*a, **k):
        gc.collect()
        seen["alive when the VLM loaded"] = seen["lrm"]() is not None
        return real_load(*a, **k)
    monkeypatch.setattr(frism, "lrm_answers", answers)
    monkeypatch.setattr(frism, "load_vlm", load_vlm)
    done = cli(trio, tmp_path / "dual", "--data", trio["data"], "--steps", "2",
               "--max-new-tokens", "6", "--objective", "dual", "--text-data", text_prompts)
    assert done.returncode == 0, done.stderr
    assert seen["alive when the VLM loaded"] is False
    report = json.loads((tmp_path / "dual" / "frism_report.json").read_text())
    assert list(report["seconds"])[:3] == ["check", "lrm_answers", "load"]  # the stage timer
    assert report["text_stream"]["answers"] == 6 and report["objective"].startswith("dual")
    assert {"kl", "kl_text", "injected"} <= report["loss_curve"][0].keys()
    card = (tmp_path / "dual" / "README.md").read_text()
    assert "| beta (--beta) | 1.0 |" in card and "text stream (--text-data)" in card


def test_the_dual_objective_is_eq10_plus_beta_times_the_kl_to_the_lrm_on_text(trio):
    model, processor, gated, args = merged_model(trio, "--alpha", "0.3")
    args.beta = 0.7
    batch, mask = a_batch(trio, processor, args)
    student, teacher = student_and_teacher(model, gated, batch, mask)
    text_student, text_lrm = torch.randn(5, 9).log_softmax(-1), torch.randn(5, 9).log_softmax(-1)
    step = frism.Step(student, [], batch, mask, gated, args, lambda: teacher,
                      lambda: (text_student, frism.top(text_lrm, 8)))  # all but one token kept
    terms = frism.dual(step)
    kl_text = (text_lrm.exp() * (text_lrm - text_student)).sum(-1).mean()  # KL(p_lrm || p_merged)
    torch.testing.assert_close(terms["kl_text"], kl_text)
    torch.testing.assert_close(terms["loss"], frism.eq10(step)["loss"] + 0.7 * kl_text)


def test_dual_at_beta_0_trains_exactly_as_eq10(trio, text_prompts):
    """The text stream is read and weighed 0: the gates, bit for bit, and every term of Eq. 10."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = dual_settings(trio, text_prompts, "--beta", "0", "--steps", "3")
    lrm = AutoModelForCausalLM.from_pretrained(trio["lrm"]).eval()
    text = frism.lrm_answers(lrm, AutoTokenizer.from_pretrained(trio["lrm"]),
                             frism.load_text_prompts(args), set(), args)
    runs = {}
    for name, objective in (("eq10", frism.eq10), ("dual", frism.dual)):
        model, processor, gated, _ = merged_model(trio)
        answers = frism.teacher_answers(model, processor, gated, frism.load_calibration(args), args)
        history = frism.train(model, processor, gated, answers, frism.Teacher(
            model, processor, gated, answers, args), objective, args, text)
        runs[name] = (torch.cat([layer.g.detach().flatten() for layer in gated.values()]),
                      history)
    assert torch.equal(runs["eq10"][0], runs["dual"][0])
    assert not torch.all(runs["eq10"][0] == 0)  # the gates did move
    for eq10, dual in zip(runs["eq10"][1], runs["dual"][1]):
        assert all(eq10[k] == dual[k] for k in eq10) and dual["kl_text"] > 0


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing.jsonl", "does not exist"),
    (lambda p: (p / "empty.jsonl", (p / "empty.jsonl").write_text("\n"))[0], "holds no prompts"),
    (lambda p: (p / "keyless.jsonl", (p / "keyless.jsonl").write_text('{"text": "hi"}\n'))[0],
     "line 1 has no 'question' (--text-column)"),
    (lambda p: (p / "number.jsonl", (p / "number.jsonl").write_text('{"question": 7}\n'))[0],
     "not text"),
    (lambda p: "no-such-org/no-such-dataset", "could not be loaded"),
], ids=["missing", "empty", "no question", "not text", "unknown hub id"])
def test_bad_text_data_is_refused_in_one_sentence_before_any_weight_loads(
        trio, tmp_path, monkeypatch, make, words):
    monkeypatch.setattr(frism, "load_vlm", lambda *a, **k: pytest.fail("the VLM was loaded"))
    monkeypatch.setattr(frism, "answer_text_prompts",
                        lambda *a, **k: pytest.fail("the LRM was loaded"))
    done = cli(trio, tmp_path / "out", "--data", trio["data"], "--objective", "dual",
               "--text-data", str(make(tmp_path)))
    assert_refused(done, tmp_path / "out", words)


def test_a_text_stream_needs_one_vocabulary(trio, tmp_path):
    from transformers import AutoConfig, AutoTokenizer
    assert frism.check_text_stream(trio["vlm"], trio["lrm"]) == set()
    other = tmp_path / "lrm"
    import shutil
    shutil.copytree(trio["lrm"], other)
    cfg = AutoConfig.from_pretrained(other)
    cfg.vocab_size += 8
    cfg.save_pretrained(other)
    with pytest.raises(frism.InputError, match="output sizes differ"):
        frism.check_text_stream(trio["vlm"], str(other))
    shutil.rmtree(other)
    shutil.copytree(trio["lrm"], other)  # a chat format of its own: a token the VLM lacks
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["</think>"], special_tokens=True)
    tok.save_pretrained(other)
    assert frism.check_text_stream(trio["vlm"], str(other)) == {
        tok.convert_tokens_to_ids("</think>")}


# ---- the model directory serves anywhere the VLM does ------------------------------------------

def loaded_by_serving_engines(path):
    """The tensors a model loader takes from a model directory, under the two file rules serving
    engines use: every *.safetensors file at the top of the directory (vLLM's and SGLang's rule
    where there is no shard index), and the files a model.safetensors.index.json names (the rule
    where there is one). {rule: {tensor name: shape}}; a name found twice fails."""
    from safetensors import safe_open
    top = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    index = os.path.join(path, "model.safetensors.index.json")
    rules = {"every file": top}
    if os.path.exists(index):
        rules["the index"] = sorted(set(json.load(open(index))["weight_map"].values()))
    out = {}
    for rule, files in rules.items():
        out[rule] = {}
        for file in files:
            with safe_open(os.path.join(path, file), "pt") as f:
                for key in f.keys():
                    assert key not in out[rule], (rule, key)
                    out[rule][key] = tuple(f.get_slice(key).get_shape())
    return out


def checkpoint_tensors(path):
    """{tensor name: shape} of a save_pretrained directory, read as transformers reads it."""
    return next(iter(loaded_by_serving_engines(path).values()))


@pytest.mark.parametrize("program, extra", [
    ("frism", ("--data", "DATA", "--steps", "2", "--max-new-tokens", "6")),
    ("frism", ("--no-train",)),
    ("frism", ("--no-train", "--rank", "3")),
    ("frism", ("--no-train", "--band", "2", "5")),
    ("frism", ("--data", "DATA", "--steps", "2", "--max-new-tokens", "6", "--rank", "4")),
    ("frism sharded", ("--no-train",)),
    ("baselines ta", ()),
    ("baselines ties", ()),
    ("baselines sharded tsv", ()),
], ids=["trained", "no-train", "no-train rank", "no-train band", "trained rank",
        "sharded frism", "ta", "ties", "sharded tsv"])
def test_a_written_model_serves_under_both_file_rules(trio, tmp_path, monkeypatch, program,
                                                      extra):
    """Whatever frism.py and baselines.py write, a loader that reads every *.safetensors file of
    the directory and one that follows its shard index both get exactly the VLM's tensors; the
    gates sit beside them, in a subdirectory no loader reads."""
    import baselines
    from transformers import PreTrainedModel
    if "sharded" in program:  # transformers shards a large model and writes an index
        save = PreTrainedModel.save_pretrained
        monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                            lambda self, path, **k: save(self, path, max_shard_size="300KB", **k))
    out = tmp_path / "out"
    argv = [a.replace("DATA", trio["data"]) for a in extra]
    if program.startswith("frism"):
        done = cli(trio, out, *argv)
    else:
        done = run_main(baselines.main, [program.split()[-1], "--vlm", trio["vlm"], "--lrm",
                                         trio["lrm"], "--base", trio["base"], "--out", str(out)])
    assert done.returncode == 0, done.stderr
    rules = loaded_by_serving_engines(out)
    assert ("the index" in rules) == ("sharded" in program)
    for rule, tensors in rules.items():
        assert tensors == checkpoint_tensors(trio["vlm"]), rule
    if program.startswith("frism"):
        assert sorted(os.listdir(out / frism.GATES_DIR)) == ["parameters.safetensors",
                                                             "values.safetensors"]
        assert f"`{frism.GATE_VALUES}`" in (out / "README.md").read_text()


def test_the_scan_writes_no_tensor_at_all(trio, tmp_path):
    done = cli(trio, tmp_path / "scan", "--data", trio["data"], "--max-new-tokens", "4",
               "--scan", "0.5", "1")
    assert done.returncode == 0, done.stderr
    assert [f for d, _, fs in os.walk(tmp_path / "scan") for f in fs
            if f.endswith(".safetensors")] == []


# ---- every input file is read at the boundary: a fault is one sentence, before any weight ----

def undecodable(path, good):
    """A .jsonl whose second line holds a byte that is not UTF-8 ("caf\\xe9")."""
    path.write_bytes(good + b'\n{"question": "caf\xe9"}\n')
    return str(path)


@pytest.mark.parametrize("flag", ["--data", "--text-data"])
def test_a_jsonl_that_is_not_utf8_is_one_sentence_naming_flag_file_and_line(trio, tmp_path,
                                                                             monkeypatch, flag):
    monkeypatch.setattr(frism, "load_vlm", lambda *a, **k: pytest.fail("the VLM was loaded"))
    root = os.path.dirname(trio["data"])
    good = open(trio["data"], "rb").read().splitlines()[0]
    path = undecodable(tmp_path / "bad.jsonl", good.replace(b'"images/', b'"' + root.encode() +
                                                             b'/images/'))
    data = path if flag == "--data" else trio["data"]
    text = ("--objective", "dual", "--text-data", path) if flag == "--text-data" else ()
    done = cli(trio, tmp_path / "out", "--data", data, *text)
    assert_refused(done, tmp_path / "out", f"{flag} {path!r} line 2 is not UTF-8 text")


def test_a_malformed_line_in_a_data_directory_names_the_file_and_the_line(trio, tmp_path,
                                                                           monkeypatch):
    """A local data directory (a documented input) read by datasets: its train.jsonl's third line
    is cut off. Read before any weight loads; the fault is one sentence with the file and line."""
    monkeypatch.setattr(frism, "load_vlm", lambda *a, **k: pytest.fail("the VLM was loaded"))
    data = tmp_path / "prompts"
    data.mkdir()
    lines = [json.dumps({"question": f"What is {n} + {n}?"}) for n in range(5)]
    lines[2] = lines[2][:12]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    done = cli(trio, tmp_path / "out", "--data", trio["data"], "--objective", "dual",
               "--text-data", str(data))
    assert_refused(done, tmp_path / "out", f"{str(data / 'train.jsonl')!r} line 3 is not JSON")


def test_the_jsonl_readers_honour_their_column_flags(trio, tmp_path):
    """--text-column reads another field of a --text-data .jsonl; --image-column and
    --question-column another of a --data .jsonl."""
    prompts = tmp_path / "problems.jsonl"
    prompts.write_text("".join(json.dumps({"question": "", "problem": f"{n} + {n}"}) + "\n"
                               for n in range(3)))
    args = dual_settings(trio, str(prompts), "--text-column", "problem")
    assert frism.load_text_prompts(args) == ["0 + 0", "1 + 1", "2 + 2"]
    root = os.path.dirname(os.path.abspath(trio["data"]))
    items = [json.loads(line) for line in open(trio["data"])]
    renamed = tmp_path / "calib.jsonl"
    renamed.write_text("".join(json.dumps({"picture": os.path.join(root, item["image"]),
                                           "prompt": f"Which digit? ({n})"}) + "\n"
                               for n, item in enumerate(items)))
    args = settings(trio, "unused", "--data", str(renamed), "--image-column", "picture",
                    "--question-column", "prompt")
    samples = frism.load_calibration(args)
    assert [q for _, q in samples] == [f"Which digit? ({n})" for n in range(len(items))]
    args = settings(trio, "unused", "--data", str(renamed))  # the defaults read image, question
    with pytest.raises(frism.InputError, match="line 1 has no 'image' or no 'question'"):
        frism.load_calibration(args)


@pytest.mark.parametrize("flag, value, data", [
    ("--data-split", "train", "--data"), ("--text-split", "test", "--text-data"),
    ("--text-config", "main", "--text-data")])
def test_a_split_or_config_flag_with_a_jsonl_is_refused(trio, tmp_path, text_prompts, flag,
                                                         value, data):
    done = cli(trio, tmp_path / "out", "--data", trio["data"], "--objective", "dual",
               "--text-data", text_prompts, flag, value)
    assert_refused(done, tmp_path / "out", f"{flag} has no effect with a .jsonl {data}")


# ---- the text stream: its own answer length, its distributions kept small ---------------------

def test_the_lrm_answers_up_to_text_max_new_tokens_not_the_teachers_limit(trio, text_prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = dual_settings(trio, text_prompts, "--max-new-tokens", "2", "--text-max-new-tokens", "7")
    lrm = AutoModelForCausalLM.from_pretrained(trio["lrm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(trio["lrm"])
    stream = frism.lrm_answers(lrm, tokenizer, frism.load_text_prompts(args), set(), args)
    assert max(len(item.ids) for item in stream.items) > 2  # the teacher's 2 do not bound it
    assert all(len(item.ids) <= 7 for item in stream.items)
    assert stream.cut == sum(len(item.ids) == 7 for item in stream.items)


def test_the_text_streams_kl_is_the_kl_of_the_distributions_coarsened_to_the_top_k():
    """With one token left outside the top k it is the full KL; with fewer kept it is never
    above it; and it is zero where the merged model is the LRM."""
    torch.manual_seed(0)
    p, q = torch.randn(6, 12).log_softmax(-1), torch.randn(6, 12).log_softmax(-1)
    full = (p.exp() * (p - q)).sum(-1).mean()
    torch.testing.assert_close(frism.text_kl(q, frism.top(p, 11)), full)
    for k in (1, 3, 6):
        assert frism.text_kl(q, frism.top(p, k)) <= full + 1e-6
        assert abs(frism.text_kl(p, frism.top(p, k))) < 1e-6
    q.requires_grad_(True)
    frism.text_kl(q, frism.top(p, 3)).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_the_dry_run_plans_the_text_streams_own_answer_length(paper_pairs, capsys):
    import re
    pair = paper_pairs["7b"]
    plans = {}
    for length in ("256", "1024"):
        frism.main(["--vlm", pair["vlm"], "--lrm", pair["lrm"], "--base", pair["base"], "--dry-run",
                    "--dtype", "bfloat16",
                    "--device-memory", "80", "--objective", "dual", "--text-max-new-tokens",
                    length])
        plans[length] = capsys.readouterr().out
    assert "up to 1024 tokens each" in plans["1024"] and "up to 256 tokens" in plans["256"]

    def gib(text, item):
        return float(re.search(rf"{item}\s+([\d.]+) GiB", text).group(1))
    for item in ("text stream activations \\(est.\\)", "KV cache, activations \\(est.\\)"):
        assert gib(plans["1024"], item) > gib(plans["256"], item)
    assert "host memory for the LRM's top-64 log-probs" in plans["1024"]
