"""The training runtime's pure parts: the generated DeepSpeed config, precision, and the reader of
the data stage's packed dataset layout (``packed/manifest.json`` + ``.npy`` shards).

The packed datasets here are written by the test itself, following the shared contract
(``llmops-packed-v1``); the runtime reads them with numpy only, so these run without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from llmops_provider.recipes import RecipeError, load_recipe
from llmops_provider.runtime.train import deepspeed_config, flatten, launch_command, resolve_precision
from llmops_provider.runtime.train_data import Blocks, BlockSampler, PackedDataError, load_manifest

pytestmark = pytest.mark.unit

DEMO = ROOT / "dags" / "recipes" / "tiny-llama.yaml"


def training(**overrides):
    recipe = load_recipe(DEMO)
    return recipe.training.model_copy(update=overrides)


# ---------------------------------------------------------------- DeepSpeed config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_config_follows_the_recipe(stage):
    t = training(zero_stage=stage, grad_accum=4, micro_batch_size=2, grad_clip=0.5, max_steps=100, warmup_steps=10)
    cfg = deepspeed_config(t, world_size=8)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_batch_size"] == 2 * 4 * 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_clipping"] == 0.5
    sched = cfg["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"]["total_num_steps"] == 100 and sched["params"]["warmup_num_steps"] == 10
    assert sched["params"]["cos_min_ratio"] == t.min_lr_ratio
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)
    assert ("contiguous_gradients" in cfg["zero_optimization"]) == (stage >= 1)
    json.dumps(cfg)  # it is written as ds_config.json and logged as params


def test_precision_bf16_on_gpu_fp32_on_cpu():
    t = training()
    assert resolve_precision("auto", gpu_bf16=True) == "bf16"
    assert resolve_precision("auto", gpu_bf16=False) == "fp32"
    assert resolve_precision("fp32", gpu_bf16=True) == "fp32"
    with pytest.raises(ValueError, match=r"training\.precision is bf16 .* set training\.precision: auto"):
        resolve_precision("bf16", gpu_bf16=False)
    gpu = deepspeed_config(t, 1, "bf16")
    assert gpu["bf16"] == {"enabled": True} and gpu["data_types"]["grad_accum_dtype"] == "fp32"
    cpu = deepspeed_config(t, 1, "fp32")
    assert cpu["bf16"] == {"enabled": False} and cpu["fp16"] == {"enabled": False} and "data_types" not in cpu


def test_new_training_fields_validate_with_a_named_error(tmp_path):
    import yaml

    raw = yaml.safe_load(DEMO.read_text())
    raw["training"]["precision"] = "fp16"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"training\.precision"):
        load_recipe(bad)
    defaults = load_recipe(DEMO).training
    assert defaults.precision == "auto" and defaults.gradient_checkpointing is False and defaults.eval_every is None


def test_params_flatten_nested_config():
    cfg = deepspeed_config(training(), 2)
    flat = flatten("ds", cfg)
    assert flat["ds.zero_optimization.stage"] == "0" and flat["ds.scheduler.params.warmup_type"] == "linear"


def test_launch_command_runs_the_module_under_the_launcher():
    cmd = launch_command("/x/spec.json", 4, launcher="/venv/bin/deepspeed", master_port=12345)
    assert cmd[:5] == ["/venv/bin/deepspeed", "--num_accelerators", "4", "--master_port", "12345"]
    assert cmd[-4:] == ["--module", "llmops_provider.runtime.train", "--spec", "/x/spec.json"]


# ---------------------------------------------------------------- packed dataset reader


def write_packed(root: Path, *, seq_len=16, dtype="uint16", shards=(5, 3), val=4, **manifest_overrides) -> np.ndarray:
    """A dataset version with packed train shards (blocks numbered so rows are recognisable)."""
    (root / "packed").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    total = sum(shards)
    train = (np.arange(total * seq_len) % 1000).reshape(total, seq_len).astype(dtype)
    files, start = [], 0
    for i, n in enumerate(shards):
        rel = f"packed/train-{i:05d}.npy"
        np.save(root / rel, train[start : start + n])
        files.append(rel)
        start += n
    np.save(root / "packed/validation-00000.npy", np.ones((val, seq_len), dtype=dtype))
    manifest = {
        "format": "llmops-packed-v1",
        "seq_len": seq_len,
        "dtype": dtype,
        "eos_token_id": 0,
        "vocab_size": 1000,
        "tokenizer": "tokenizer",
        "splits": {
            "train": {"files": files, "blocks": total, "tokens": total * seq_len},
            "validation": {"files": ["packed/validation-00000.npy"], "blocks": val, "tokens": val * seq_len},
        },
    }
    manifest.update(manifest_overrides)
    (root / "packed" / "manifest.json").write_text(json.dumps(manifest))
    return train


def test_reads_the_packed_layout_across_shards(tmp_path):
    train = write_packed(tmp_path)
    manifest = load_manifest(tmp_path, seq_len=16)
    assert manifest is not None and manifest.tokenizer_dir == tmp_path / "tokenizer"
    blocks = manifest.split("train")
    assert len(blocks) == 8 and blocks.seq_len == 16
    assert all(isinstance(a, np.memmap) for a in blocks.arrays), "shards are memory-mapped, not loaded"
    rows = blocks.take([7, 0, 5, 4])  # crosses the shard boundary at 5, in the order asked
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, train[[7, 0, 5, 4]].astype(np.int64))
    assert len(manifest.split("validation", limit=2)) >= 2


def test_no_manifest_means_the_jsonl_fallback(tmp_path):
    assert load_manifest(tmp_path, seq_len=16) is None


def test_seq_len_mismatch_names_both_fields_and_the_fix(tmp_path):
    write_packed(tmp_path, seq_len=16)
    with pytest.raises(PackedDataError, match=r"seq_len 16 but training\.seq_len is 32; set training\.seq_len: 16"):
        load_manifest(tmp_path, seq_len=32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"format": "other-v9"}, r"`format` is 'other-v9'"),
        ({"dtype": "float32"}, r"`dtype` 'float32' is not an integer token dtype"),
        (
            {"splits": {"train": {"files": ["packed/gone.npy"], "blocks": 1}}},
            r"lists packed/gone\.npy, which is missing",
        ),
    ],
)
def test_broken_manifests_fail_with_a_named_field(tmp_path, overrides, message):
    write_packed(tmp_path, **overrides)
    with pytest.raises(PackedDataError, match=message):
        load_manifest(tmp_path, seq_len=16).split("train")


def test_block_count_and_dtype_are_checked_against_the_manifest(tmp_path):
    write_packed(tmp_path)
    raw = json.loads((tmp_path / "packed/manifest.json").read_text())
    raw["splits"]["train"]["blocks"] = 9
    (tmp_path / "packed/manifest.json").write_text(json.dumps(raw))
    with pytest.raises(PackedDataError, match=r"`splits\.train\.blocks` is 9 but the files hold 8"):
        load_manifest(tmp_path, 16).split("train")
    raw["splits"]["train"]["blocks"] = 8
    raw["dtype"] = "uint32"
    (tmp_path / "packed/manifest.json").write_text(json.dumps(raw))
    with pytest.raises(PackedDataError, match=r"dtype uint16, the manifest says `dtype: uint32`"):
        load_manifest(tmp_path, 16).split("train")
    with pytest.raises(PackedDataError, match=r"no `splits\.test`"):
        load_manifest(tmp_path, 16).split("test")


def test_blocks_of_the_wrong_width_are_refused(tmp_path):
    write_packed(tmp_path)
    np.save(tmp_path / "packed/train-00001.npy", np.zeros((3, 8), dtype="uint16"))
    with pytest.raises(PackedDataError, match=r"shape \(3, 8\), expected \[n_blocks, 16\]"):
        load_manifest(tmp_path, 16).split("train")


# ---------------------------------------------------------------- data order


def test_sampler_is_deterministic_disjoint_across_ranks_and_covers_an_epoch():
    world, batch, n = 2, 3, 20
    samplers = [BlockSampler(n, batch, rank, world, seed=7) for rank in range(world)]
    per_epoch = samplers[0].per_epoch
    assert per_epoch == n // (batch * world)
    seen = [i for m in range(per_epoch) for s in samplers for i in s.indices(m).tolist()]
    assert len(seen) == len(set(seen)) == per_epoch * batch * world
    again = BlockSampler(n, batch, 1, world, seed=7)
    for m in (0, 5, per_epoch + 2):  # a resumed sampler at micro step m reads what the first one read
        assert again.indices(m).tolist() == samplers[1].indices(m).tolist()
    assert samplers[0].indices(per_epoch).tolist() != samplers[0].indices(0).tolist(), "reshuffled each epoch"
    assert BlockSampler(n, batch, 0, world, seed=8).indices(0).tolist() != samplers[0].indices(0).tolist()
    assert samplers[0].state(12) == {"micro_step": 12, "n_blocks": 20, "world": 2, "batch": 3, "seed": 7}


def test_too_few_blocks_for_one_step_names_the_fix():
    with pytest.raises(ValueError, match=r"micro_batch_size x ranks.*lower training\.seq_len/micro_batch_size"):
        BlockSampler(5, 4, 0, 2, seed=0)


def test_blocks_from_the_jsonl_packer_share_the_interface():
    blocks = Blocks([np.arange(12, dtype=np.int64).reshape(3, 4)])
    assert len(blocks) == 3 and blocks.take([2]).tolist() == [[8, 9, 10, 11]]
