"""The miniature's progress bar: one bar over every stage a run makes (each world's training
steps, each world check, scan, merge, training and scoring), each stage weighing what it took on
the 2-core machine of docs/miniature.md#time, so that the bar's "about ... left" is this
machine's time remaining. Uses nothing else of the project."""
import contextlib
import functools

from tqdm.auto import tqdm

# What a stage took on that machine, in seconds: a world's training step by stage, a world saved,
# the world check, the scan, a training-free merge, a training run's fixed cost and its steps (a
# second stream, the oracle's or the text stream's, costs STREAMS times a step), the LRM's answer
# tokens on the text stream, one benchmark pass of a row, the second-order reading.
ESTIMATES = {"base": 0.058, "lrm": 0.093, "vision": 0.033, "vlm": 0.1, "world saved": 4.0,
             "world check": 7.0, "lambda scan": 1.1, "merge": 0.1, "training": 1.5,
             "training step": 0.03, "lrm answer token": 0.002, "score": 2.2, "reading": 40.0}
STREAMS = 2.5


class Progress:
    """One bar over every stage the run makes, each weighing what it took on the machine of
    ESTIMATES: the bar's rate is this machine's against that one, and so is its estimate of the
    time left."""

    def __init__(self, total):
        self.bar = tqdm(total=total, desc="toy.py, every stage", position=0, disable=not total,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} so far, about "
                                   "{remaining} left{postfix}")

    def advance(self, seconds):
        self.bar.update(seconds)

    @contextlib.contextmanager
    def stage(self, name, weight):
        self.bar.set_postfix_str(name, refresh=True)
        done = self.bar.n
        yield
        self.bar.update(max(0.0, weight - (self.bar.n - done)))  # what the stage ticked counts once

    def close(self):
        self.bar.close()


def world_weight(stages):
    """A world's weight: {stage: its settings} (world.stages())."""
    return sum(stage["steps"] * ESTIMATES[name] for name, stage in stages.items()) + \
        ESTIMATES["world saved"]


def flag(argv, name, default=None):
    """The last value of `name` in a command line, or `default`."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1] if name in argv else default


def row_weight(program, argv, validate=False, prompts=64):
    """A row's weight on the progress bar: a merge or a training run (with the LRM's answers to
    the text stream: `prompts` answers of up to --text-max-new-tokens), then its scoring (twice for
    a row also scored on the held-out split)."""
    scoring = ESTIMATES["score"] * (2 if validate else 1)
    if program is None:
        return scoring
    if "--data" not in argv:  # training-free
        return ESTIMATES["merge"] + scoring
    steps = int(flag(argv, "--steps"))
    streams = isinstance(program, functools.partial) or "--text-data" in argv
    answers = prompts * int(flag(argv, "--text-max-new-tokens", 1024)) if "--text-data" in argv \
        else 0
    return ESTIMATES["training"] + (STREAMS if streams else 1.0) * steps * \
        ESTIMATES["training step"] + answers * ESTIMATES["lrm answer token"] + scoring
