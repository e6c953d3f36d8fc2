"""eval.py: the scoring rules on realistic outputs, then the whole command on the tiny trio."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval as ev
from test_frism import run_main

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- scoring rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("output, prompt, expected", [
    ("<think>3 + 4 = 7, so...</think>\nThe answer is 7.", "", ("The answer is 7.", False)),
    ("<think>a</think>first<think>b</think> final", "", ("final", False)),
    ("<think>Let me count the apples one by one: 1, 2, 3", "", ("", True)),
    ("counting...</think>\\boxed{5}", "<|im_start|>assistant\n<think>\n", ("\\boxed{5}", False)),
    ("counting, still counting", "<|im_start|>assistant\n<think>\n", ("", True)),
    ("Yes, there is a dog.", "", ("Yes, there is a dog.", False)),
])
def test_strip_thinking_keeps_the_text_after_the_last_think_block(output, prompt, expected):
    assert ev.strip_thinking(output, prompt) == expected


@pytest.mark.parametrize("text, choices, letter", [
    ("The answer is (B).", None, "B"),
    ("B. 45 degrees", None, "B"),
    ("Therefore the final answer is \\boxed{C}.", None, "C"),
    ("Answer: D", None, "D"),
    ("(A) 30", None, "A"),
    ("A triangle has three sides, so the correct option is C", None, "C"),
    ("The angle must be 45°.", ["30°", "45°", "60°"], "B"),
    ("E", ["1", "2", "3", "4", "5"], "E"),
    ("I am not sure.", None, None),
])
def test_extract_letter(text, choices, letter):
    assert ev.extract_letter(text, choices) == letter


@pytest.mark.parametrize("text, number", [
    ("So the area is \\boxed{\\frac{3}{4}}.", 0.75),
    ("\\boxed{\\dfrac{1}{2}}", 0.5),
    ("In total there are 1,250 apples.", 1250.0),
    ("The growth was 45%.", 45.0),
    ("We get x = -2.5", -2.5),
    ("Step 1 gives 3, step 2 gives 12. The answer is \\boxed{12}, not 13", 12.0),
    ("\\boxed{3/4}", 0.75),
    ("No number here.", None),
])
def test_extract_number(text, number):
    assert ev.extract_number(text) == number


def test_numbers_are_compared_at_the_benchmarks_precision():
    assert ev.numbers_match(1.234, 1.23, precision=2)
    assert not ev.numbers_match(1.3, 1.23, precision=2)
    assert ev.numbers_match(7.0, 7.0, precision=0) and not ev.numbers_match(7.4, 8, precision=0)
    assert ev.numbers_match(0.75, 3 / 4) and not ev.numbers_match(None, 1.0)


@pytest.mark.parametrize("text, answer", [
    ("Yes, there is a dog.", "yes"), ("No, there isn't.", "no"), ("There is no dog.", "no"),
    ("yes", "yes"), ("I cannot tell.", None), ("Nobody knows.", None),
])
def test_extract_yes_no_is_word_level(text, answer):
    assert ev.extract_yes_no(text) == answer


def test_score_answer_by_type():
    assert ev.score_answer("The answer is (b)", {"type": "mc", "answer": "B"}) == ("B", True)
    assert ev.score_answer("So it is 2.50", {"type": "number", "answer": "2.5",
                                            "precision": 1}) == (2.5, True)
    assert ev.score_answer("Yes.", {"type": "yesno", "answer": "No"}) == ("yes", False)
    assert ev.score_answer("The answer is Paris.", {"type": "text", "answer": "paris"})[1]


def mathvista_row(**fields):
    row = {"pid": "1", "decoded_image": None, "query": "Hint: ...", "question_type": "free_form",
           "answer_type": "integer", "choices": None, "answer": "5", "precision": None}
    return dict(row, **fields)


def scored(item, text):
    return ev.score_answer(text, item)[1]


def test_mathvista_compares_the_chosen_options_text_with_the_answer():
    item = ev.mathvista_item(mathvista_row(question_type="multi_choice", answer_type="text",
                                           choices=["2", "5"], answer="5"))
    assert scored(item, "The answer is (B).") and not scored(item, "(A)")


def test_mathvista_duplicate_options_are_both_right():
    item = ev.mathvista_item(mathvista_row(question_type="multi_choice", answer_type="text",
                                           choices=["12", "18", "24", "18"], answer="18"))
    assert scored(item, "(B)") and scored(item, "(D)") and not scored(item, "(C)")


def test_mathvista_options_that_are_letters_and_trailing_spaces():
    letters = ev.mathvista_item(mathvista_row(question_type="multi_choice", answer_type="text",
                                              choices=["A", "B", "C", "D"], answer="C"))
    assert scored(letters, "Answer: C") and not scored(letters, "A cat is in the picture, so B")
    spaced = ev.mathvista_item(mathvista_row(question_type="multi_choice", answer_type="text",
                                             choices=["yes ", "no "], answer="no"))
    assert scored(spaced, "(B)") and not scored(spaced, "(A)")


def test_mathvista_precision_is_a_float_or_none_and_integers_are_truncated():
    two = ev.mathvista_item(mathvista_row(answer_type="float", precision=2.0, answer="1.25"))
    assert two["precision"] == 2 and scored(two, "about 1.2512") and not scored(two, "1.3")
    none = ev.mathvista_item(mathvista_row(answer_type="float", precision=None, answer="0.5"))
    assert none["precision"] is None and scored(none, "0.5")
    integer = ev.mathvista_item(mathvista_row(answer_type="integer", answer="7"))
    assert scored(integer, "7") and scored(integer, "7.4") and not scored(integer, "8")


def mathverse_row(answer, question="Find x. Choices:\nA:False\nB:True\nC:2\nD:4",
                  version="Text Lite"):
    return {"sample_index": "1", "problem_index": "1", "problem_version": version,
            "question": question, "image": None, "answer": answer,
            "question_type": "multi-choice", "query_wo": "q",
            "query_cot": "Please reason step by step, then give the letter.\nQuestion: " + question}


@pytest.mark.parametrize("answer, right, wrong, form", [
    ("B", ["The answer is B."], ["(A)"], "letter"),
    ("(C)", ["\\boxed{C}"], ["(D)"], "parenthesised letter"),
    ("False", ["(A)", "The answer is False."], ["(B)", "The answer is True."], "option text"),
    ("C\nD", ["(C)", "(D)"], ["(A)"], "several letters"),
])
def test_mathverse_answer_forms(answer, right, wrong, form):
    item = ev.mathverse_item(mathverse_row(answer))
    assert item["answer_form"] == form
    assert all(scored(item, text) for text in right)
    assert not any(scored(item, text) for text in wrong)


def test_mathverse_vision_only_prompts_from_query_cot_and_forms_are_counted():
    item = ev.mathverse_item(mathverse_row("B", question="", version="Vision Only"))
    assert item["question"].startswith("Please reason") and item["choices"] is None
    items = [ev.mathverse_item(mathverse_row(a)) for a in ("B", "A", "(C)", "False", "C\nD")]
    result = ev.score_benchmark("mathverse", items, [("", "(B)", False)] * 5)
    assert result["metrics"]["answer_forms"] == {"letter": 2, "option text": 1,
                                                 "parenthesised letter": 1, "several letters": 1}
    assert [p["correct"] for p in result["predictions"]] == [True, False, False, False, False]


def test_mathvision_letter_options_and_letter_answers_without_options():
    row = {"id": "1", "question": "Which shape?", "decoded_image": None, "answer": "C",
           "options": ["A", "B", "C", "D", "E"]}
    item = ev.mathvision_item(row)
    assert item["type"] == "mc" and "(A) A" not in item["question"]
    assert scored(item, "It must be \\boxed{C}") and not scored(item, "A bit of thought: \\boxed{B}")
    bare = ev.mathvision_item(dict(row, options=[]))
    assert bare["type"] == "mc" and scored(bare, "\\boxed{C}") and not scored(bare, "\\boxed{3}")
    number = ev.mathvision_item(dict(row, options=[], answer="4"))
    assert number["type"] == "number" and scored(number, "\\boxed{4}")


def test_mme_questions_keep_their_own_hint_and_images_pair_within_a_subtask():
    rows = [{"question_id": "0001.png", "question": "Is the code correct? Please answer yes or no.",
             "answer": "Yes", "category": task, "image": None}
            for task in ("code_reasoning", "numerical_calculation")]
    items = [ev.mme_item(row) for row in rows]
    assert items[0]["question"].count("Please answer yes or no.") == 1
    assert items[0]["pair"] != items[1]["pair"]  # the same bare file name in two subtasks
    assert scored(items[0], "yes")


def test_pope_reports_each_category_beside_the_pooled_figures():
    rows = [("adversarial", "yes", "Yes."), ("adversarial", "no", "Yes."),
            ("random", "no", "No."), ("random", "yes", "No.")]
    items = [ev.pope_item({"question_id": str(i), "image": None, "question": "Is there a cat?",
                           "answer": gold, "category": cat}) for i, (cat, gold, _) in enumerate(rows)]
    result = ev.score_benchmark("pope", items, [("", said, False) for *_, said in rows])
    per = result["metrics"]["per_category"]
    assert per["adversarial"] == {"accuracy": 50.0, "precision": 50.0, "recall": 100.0,
                                  "f1": pytest.approx(200 / 3), "yes_ratio": 100.0}
    assert per["random"] == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                             "yes_ratio": 0.0}
    assert result["score"] == result["metrics"]["accuracy"] == 50.0


# ---- the command, end to end on the tiny trio ------------------------------------------------

def draw(path):
    Image.new("RGB", (56, 56), "white").save(path)
    return os.path.basename(path)


@pytest.fixture(scope="module")
def local_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    items = [
        {"image": draw(root / "a.png"), "question": "What number is shown?", "answer": "3",
         "kind": "perception"},
        {"image": draw(root / "b.png"), "question": "Is there a digit?", "answer": "yes",
         "kind": "perception"},
        {"question": "What is 2 + 3?", "answer": "5", "kind": "reasoning"},
        {"question": "Which is larger?", "choices": ["7", "2"], "answer": "7",
         "kind": "reasoning"},
    ]
    path = root / "toy.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def run_eval(*args):
    return run_main(ev.main, list(args))


def test_eval_scores_a_vlm_and_a_text_only_lrm_side_by_side(trio, local_bench, tmp_path):
    out = tmp_path / "results.json"
    done = run_eval("--models", trio["vlm"], trio["lrm"], "--benchmarks", local_bench,
                    "--max-new-tokens", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    header, vlm_row, lrm_row = done.stdout.strip().splitlines()
    assert header.split() == ["model", "toy/perception", "toy/reasoning", "reasoning", "avg",
                              "perception", "avg"]
    assert vlm_row.split()[0] == "vlm" and lrm_row.split()[0] == "lrm"
    assert lrm_row.split()[1] == "-"  # the LRM cannot see images
    report = json.loads(out.read_text())
    vlm, lrm = report["results"][trio["vlm"]], report["results"][trio["lrm"]]
    assert len(vlm["toy/perception"]["predictions"]) == 2
    assert len(vlm["toy/reasoning"]["predictions"]) == 2
    assert lrm["toy/perception"] is None and len(lrm["toy/reasoning"]["predictions"]) == 2
    assert report["averages"][trio["lrm"]]["perception"] is None
    assert report["kinds"] == {"toy/perception": "perception", "toy/reasoning": "reasoning"}
    prediction = vlm["toy/reasoning"]["predictions"][1]
    assert prediction["answer"] == "A" and "(A) 7" in prediction["question"]
    assert {"output", "extracted", "correct", "truncated_in_think"} <= prediction.keys()


def hub_copy(tmp_path, name, rows, image_column="image"):
    """A save_to_disk stand-in for a hub benchmark, with the real column names."""
    import datasets
    ds = datasets.Dataset.from_dict(rows).cast_column(image_column, datasets.Image())
    ds.save_to_disk(str(tmp_path / name))
    return f"{name}={tmp_path / name}"


def test_metrics_on_known_outputs(trio, tmp_path, monkeypatch):
    """Canned outputs in place of generation: the scores must be exactly what the rules say."""
    white = Image.new("RGB", (56, 56), "white")
    pope = hub_copy(tmp_path, "pope", {
        "id": ["0", "1", "2", "3"], "question_id": ["0", "1", "2", "3"],
        "question": ["Is there a dog in the image?"] * 4, "answer": ["yes", "yes", "no", "no"],
        "image_source": ["x"] * 4, "image": [white] * 4, "category": ["random"] * 4})
    mme = hub_copy(tmp_path, "mme", {
        "question_id": ["a.jpg", "a.jpg", "b.jpg", "b.jpg", "c.jpg", "c.jpg"],
        "image": [white] * 6,
        "question": ["Is this red? Please answer yes or no."] * 6,
        "answer": ["Yes", "No", "Yes", "No", "Yes", "No"],
        "category": ["color"] * 4 + ["code_reasoning"] * 2})
    canned = {"pope": ["Yes.", "No.", "Yes, it is.", "No, there is not."],
              "mme": ["Yes", "No", "Yes", "Yes", "No", "No"]}

    def fake_generate(m, items, args, desc):
        bench = desc.split(" / ")[1]
        return [("", text, False) for text in canned[bench][:len(items)]]

    monkeypatch.setattr(ev, "generate", fake_generate)
    args = ev.parse_args(["--models", trio["vlm"], "--benchmarks", pope, mme,
                          "--out", str(tmp_path / "r.json")])
    report = ev.run(args)
    scores = report["results"][trio["vlm"]]
    assert scores["pope"]["metrics"]["accuracy"] == 50.0
    assert scores["pope"]["metrics"]["precision"] == 50.0  # yes said twice, once rightly
    assert scores["pope"]["metrics"]["recall"] == 50.0
    assert scores["pope"]["metrics"]["f1"] == 50.0
    color = scores["mme"]["metrics"]["subtasks"]["color"]
    assert color == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}  # image a right, b half
    code = scores["mme"]["metrics"]["subtasks"]["code_reasoning"]
    assert code == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert scores["mme"]["metrics"]["perception_total"] == 125.0
    assert scores["mme"]["metrics"]["cognition_total"] == 50.0
    assert scores["mme"]["score"] == 62.5  # perception on a 0-100 scale: 125 / 200
    assert report["averages"][trio["vlm"]] == {"reasoning": None, "perception": 56.25}


def test_hub_benchmark_layouts_run_end_to_end(trio, tmp_path):
    """MathVista, MathVerse, MathVision and MMStar stand-ins with their real columns."""
    white = Image.new("RGB", (56, 56), "white")
    benches = [
        hub_copy(tmp_path, "mathvista", {
            "pid": ["1", "2"], "question": ["q", "q"], "image": ["a.png", "b.png"],
            "decoded_image": [white, white], "choices": [["2", "5"], None],
            "unit": [None, None], "precision": [None, 1.0], "answer": ["5", "1.5"],
            "question_type": ["multi_choice", "free_form"],
            "answer_type": ["text", "float"], "query": ["Which? (A) 2 (B) 5", "How long?"]},
            image_column="decoded_image"),
        hub_copy(tmp_path, "mathverse", {
            "sample_index": ["1", "2"], "problem_index": ["1", "1"],
            "problem_version": ["Vision Only", "Text Lite"], "question": ["q", "q"],
            "image": [white, white], "answer": ["B", "12"],
            "question_type": ["multi-choice", "free-form"],
            "query_wo": ["q", "q"], "query_cot": ["Pick one.", "Compute."]}),
        hub_copy(tmp_path, "mathvision", {
            "id": ["1", "2"], "question": ["Which?", "How many?"], "options": [["1", "2"], []],
            "image": ["a.png", "b.png"], "decoded_image": [white, white], "answer": ["A", "4"],
            "solution": ["", ""], "level": [1, 2], "subject": ["counting", "counting"]},
            image_column="decoded_image"),
        hub_copy(tmp_path, "mmstar", {
            "index": [0], "question": ["Which? Options: A: x, B: y"], "image": [white],
            "answer": ["A"], "category": ["coarse perception"], "l2_category": ["x"],
            "meta_info": [{"source": "x"}]}),
    ]
    out = tmp_path / "r.json"
    done = run_eval("--models", trio["vlm"], "--benchmarks", *benches, "--max-new-tokens", "3",
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    results = report["results"][trio["vlm"]]
    assert [results[b]["metrics"]["n"] for b in ("mathvista", "mathverse", "mathvision",
                                                 "mmstar")] == [2, 1, 2, 1]  # MC subset
    assert report["kinds"]["mmstar"] == "perception"
    assert report["kinds"]["mathvision"] == "reasoning"
    assert "\\boxed{}" in results["mathvision"]["predictions"][1]["question"]


@pytest.mark.parametrize("args, words", [
    (["--benchmarks", "nosuchbench"], "unknown benchmark"),
    (["--benchmarks", "missing.jsonl"], "does not exist"),
    (["--benchmarks", "EMPTY"], "holds no items"),
])
def test_bad_benchmarks_are_refused(trio, tmp_path, args, words):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    done = run_eval("--models", trio["vlm"], *args, "--out", str(tmp_path / "r.json"))
    assert done.returncode == 2 and words in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r.json").exists()


def test_missing_model_is_refused(local_bench, tmp_path):
    done = run_eval("--models", str(tmp_path / "nowhere"), "--benchmarks", local_bench)
    assert done.returncode == 2 and "nowhere" in done.stderr


def test_a_hub_load_failure_names_the_benchmark_and_the_local_copy_way(trio, tmp_path):
    done = run_eval("--models", trio["vlm"], "--benchmarks", "pope", "--out",
                    str(tmp_path / "r.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'pope'" in done.stderr and "pope=PATH" in done.stderr


def test_eval_py_copied_alone_scores_a_jsonl_benchmark(trio, local_bench, tmp_path):
    """A scorer must not depend on how a model was made: eval.py imports nothing of this project."""
    import shutil
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(HERE, "eval.py"), alone)
    done = subprocess.run([sys.executable, "eval.py", "--models", trio["vlm"], "--benchmarks",
                           local_bench, "--max-new-tokens", "3", "--out", "r.json"],
                          cwd=alone, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""))
    assert done.returncode == 0, done.stderr
    assert json.loads((alone / "r.json").read_text())["results"][trio["vlm"]]["toy/perception"]


def truncated_copy(trio, tmp_path):
    import shutil
    broken = tmp_path / "broken-vlm"
    shutil.copytree(trio["vlm"], broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    return str(broken)


def test_results_are_kept_after_each_model_and_a_broken_model_does_not_stop_the_rest(
        trio, local_bench, tmp_path):
    out = tmp_path / "r.json"
    done = run_eval("--models", truncated_copy(trio, tmp_path), trio["vlm"], "--benchmarks",
                    local_bench, "--max-new-tokens", "3", "--out", str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "broken-vlm: could not be loaded" in done.stderr and "re-download" in done.stderr
    report = json.loads(out.read_text())
    assert list(report["results"]) == [trio["vlm"]] and "broken-vlm" in next(iter(report["failed"]))


def test_a_crash_keeps_the_finished_models_and_resume_runs_only_what_is_missing(
        trio, local_bench, tmp_path, monkeypatch):
    out = str(tmp_path / "r.json")
    real_generate = ev.generate

    def crash_on_the_lrm(m, items, args, desc):
        if desc.startswith("lrm"):
            raise RuntimeError("CUDA out of memory")
        return real_generate(m, items, args, desc)

    monkeypatch.setattr(ev, "generate", crash_on_the_lrm)
    argv = ["--models", trio["vlm"], trio["lrm"], "--benchmarks", local_bench,
            "--max-new-tokens", "3", "--out", out]
    with pytest.raises(RuntimeError):
        ev.run(ev.parse_args(argv))
    kept = json.loads(open(out).read())
    assert len(kept["results"][trio["vlm"]]) == 2  # written before the LRM started
    assert kept["results"][trio["lrm"]] == {"toy/perception": None}  # text-only: nothing to see

    calls = []
    monkeypatch.setattr(ev, "generate", lambda m, items, args, desc: calls.append(desc) or
                        real_generate(m, items, args, desc))
    report = ev.run(ev.parse_args(argv + ["--resume"]))
    assert calls == ["lrm / toy/reasoning"]  # the VLM's pairs were not scored again
    assert report["results"][trio["vlm"]] == kept["results"][trio["vlm"]]
    assert report["results"][trio["lrm"]]["toy/reasoning"]["metrics"]["n"] == 2
    with pytest.raises(ev.InputError, match="other settings"):
        ev.run(ev.parse_args(argv + ["--resume", "--max-new-tokens", "5"]))


@pytest.mark.parametrize("flag, value", [("--max-pixels", "10"), ("--batch-size", "0"),
                                         ("--limit", "-3")])
def test_bad_numbers_are_refused_before_any_work(trio, local_bench, tmp_path, flag, value):
    done = run_eval("--models", trio["vlm"], "--benchmarks", local_bench, flag, value,
                    "--out", str(tmp_path / "r.json"))
    assert done.returncode == 2 and flag in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_reference_answer_is_scored_by_its_log_likelihood_beside_exact_match(trio, tmp_path):
    """An item with a `reference` (a worked chain) gets, for each model, the mean log-probability
    per token of that reference after its prompt, teacher-forced: the same number a direct
    forward pass gives, for an image item and a text item alike; other fields ride along."""
    import torch.nn.functional as F
    from transformers import AutoModelForImageTextToText, AutoProcessor
    root = tmp_path / "bench"
    root.mkdir()
    items = [{"image": draw(root / "a.png"), "question": "What number is shown?", "answer": "3",
              "kind": "reasoning", "reference": "The number is 3.", "depth": 2},
             {"question": "What is 2 + 3?", "answer": "5", "kind": "reasoning",
              "reference": "2 + 3 = 5."}]
    path = root / "chains.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    out = tmp_path / "results.json"
    done = run_eval("--models", trio["vlm"], "--benchmarks", str(path), "--max-new-tokens", "3",
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())["results"][trio["vlm"]]["chains"]
    predictions = result["predictions"]
    assert predictions[0]["depth"] == 2 and "depth" not in predictions[1]
    model = AutoModelForImageTextToText.from_pretrained(trio["vlm"]).eval()
    processor = AutoProcessor.from_pretrained(trio["vlm"])
    m = {"model": model, "processor": processor, "tokenizer": processor.tokenizer, "vision": True}
    args = ev.parse_args(["--models", "x"])
    loaded = ev.load_local(str(path), None)
    for item, prediction in zip(loaded, predictions):
        prompt = ev.chat(m, item["question"], item.get("image") is not None, args.system)
        inputs = processor(text=[prompt], images=[[ev.fit_pixels(item["image"], args.max_pixels)]]
                           if item.get("image") else None, return_tensors="pt")
        answer = processor.tokenizer(item["reference"], add_special_tokens=False).input_ids
        n = inputs["input_ids"].shape[1]
        whole = {k: torch.cat([v, torch.tensor([answer]) if k == "input_ids" else
                               torch.full((1, len(answer)), int(k == "attention_mask"))], dim=1)
                 if torch.is_tensor(v) and v.shape == inputs["input_ids"].shape else v
                 for k, v in inputs.items()}  # every per-token tensor extended to the answer
        with torch.no_grad():
            logp = F.log_softmax(model(**whole).logits[0].float(), -1)
        expected = logp[torch.arange(n - 1, n - 1 + len(answer)), torch.tensor(answer)].mean()
        assert prediction["reference_logp"] == pytest.approx(expected.item(), abs=1e-4)
    assert result["metrics"]["reference_logp"] == pytest.approx(
        sum(p["reference_logp"] for p in predictions) / 2)


def test_an_empty_system_prompt_sends_no_system_turn(trio):
    """--system "" leaves the system turn out: the chat is the user's turn alone, as the model's
    own template writes it (a model with no template gets the question as plain text)."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(trio["vlm"])
    m = {"processor": processor, "tokenizer": processor.tokenizer}
    with_system = ev.chat(m, "What is 2 + 3?", False, "You are terse.")
    without = ev.chat(m, "What is 2 + 3?", False, "")
    assert "You are terse." in with_system and "system" not in without
    assert without == processor.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True)
