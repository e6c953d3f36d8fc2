"""Shared fixtures: one tiny base / LRM / VLM trio of the real classes (and an LRM that does not
fit it), built once per session."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from miniature import world  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: benchmarks, deselected by default (pytest -m bench)")
    config.addinivalue_line("markers", "toy: needs a trained miniature world (minutes), deselected "
                            "by default (pytest -m toy)")
    config.addinivalue_line("markers", "layer: a property of whatever parameters the gated layer "
                            "adds; test_docs runs these on the forking page's edit of GatedLinear")


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """{"base", "lrm", "vlm", "data"}: save_pretrained directories and a calibration .jsonl."""
    return world.build_tiny_trio(str(tmp_path_factory.mktemp("trio")))


@pytest.fixture(scope="session")
def wide_lrm(trio, tmp_path_factory):
    """An LRM whose FFN is wider than the VLM's: it cannot be merged."""
    from transformers import AutoConfig, Qwen2ForCausalLM
    cfg = AutoConfig.from_pretrained(trio["lrm"])
    cfg.intermediate_size += 8
    path = str(tmp_path_factory.mktemp("wide") / "lrm")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Benchmarks and trained-world tests run only when asked for (-m bench, -m toy)."""
    if config.getoption("-m"):
        return
    keep = [item for item in items if "bench" not in item.keywords and "toy" not in item.keywords]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
