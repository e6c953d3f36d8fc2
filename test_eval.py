"""eval.py: the scoring rules on realistic outputs, then the whole command on the tiny trio."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import eval as ev

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


def test_mathvista_answers_are_option_text_mapped_to_letters():
    row = {"pid": "1", "decoded_image": None, "query": "Hint: ...\nChoices:\n(A) 2\n(B) 5",
           "question_type": "multi_choice", "answer_type": "text", "choices": ["2", "5"],
           "answer": "5", "precision": None}
    assert ev.mathvista_item(row)["answer"] == "B"
    row.update(question_type="free_form", answer_type="float", precision=2, answer="1.25",
               choices=None)
    item = ev.mathvista_item(row)
    assert item["type"] == "number" and item["precision"] == 2


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
    return subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), *args],
                          capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))


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
