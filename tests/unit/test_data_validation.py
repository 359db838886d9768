"""The data gate's own checks (besides the GE expectations): accounting, split shares, packed shards."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from llmops_provider.operators.data import _accounting_check, _packed_check, _proportion_checks
from llmops_provider.recipes import DataSpec

pytestmark = pytest.mark.unit

STEPS = [
    {"step": "parse", "in": 10, "out": 9, "dropped": {"invalid_json": 1}},
    {"step": "length", "in": 9, "out": 7, "dropped": {"text_too_short": 2}},
]


def test_accounting_check_fails_when_a_record_is_unaccounted():
    good = {"input_lines": 11, "blank_lines": 1, "quarantined": 1, "excluded": 2, "kept": 7, "steps": STEPS}
    assert _accounting_check(good)["success"] is True
    assert _accounting_check({**good, "kept": 6})["success"] is False
    broken_chain = [STEPS[0], {**STEPS[1], "in": 8, "out": 6}]
    assert _accounting_check({**good, "steps": broken_chain, "kept": 6, "excluded": 3})["success"] is False


def test_split_proportions_follow_the_recipe_within_tolerance():
    data = DataSpec(sources=[{"path": "/x"}])
    ids = pd.DataFrame(
        {"id": [str(i) for i in range(1000)], "split": ["train"] * 900 + ["validation"] * 50 + ["test"] * 50}
    )
    assert all(r["success"] for r in _proportion_checks(ids, data))
    skewed = ids.assign(split=["train"] * 600 + ["validation"] * 350 + ["test"] * 50)
    failed = {r["scope"] for r in _proportion_checks(skewed, data) if not r["success"]}
    assert failed == {"train", "validation"}


def test_packed_check_compares_shards_with_the_manifest(tmp_path):
    (tmp_path / "packed").mkdir()
    np.save(tmp_path / "packed" / "train-00000.npy", np.ones((3, 8), dtype=np.uint16))
    manifest = {"format": "llmops-packed-v1", "seq_len": 8, "dtype": "uint16", "vocab_size": 100,
                "splits": {"train": {"files": ["packed/train-00000.npy"], "blocks": 3, "tokens": 24}}}  # fmt: skip
    (tmp_path / "packed" / "manifest.json").write_text(json.dumps(manifest))
    assert _packed_check(tmp_path)["success"] is True
    manifest["splits"]["train"]["blocks"] = 4
    (tmp_path / "packed" / "manifest.json").write_text(json.dumps(manifest))
    row = _packed_check(tmp_path)
    assert row["success"] is False and "3 blocks on disk" in row["observed"]
