from pathlib import Path

import pytest
import yaml

from llmops_provider.recipes import RecipeError, load_recipe

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "dags" / "recipes" / "tiny-llama.yaml"


def _write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def test_demo_recipe_is_valid():
    recipe = load_recipe(DEMO)
    assert recipe.name == "tiny-llama"
    assert recipe.training.method == "lora"
    assert recipe.evaluation.thresholds["perplexity"].max == 1000.0


def test_fingerprint_ignores_where_it_runs_but_not_what_it_trains(tmp_path):
    base = load_recipe(DEMO).fingerprint()
    data = _demo()
    data["training"]["backend"] = "kubernetes"
    assert load_recipe(_write(tmp_path, data)).fingerprint() == base
    data["training"]["max_steps"] = 61
    assert load_recipe(_write(tmp_path, data)).fingerprint() != base


@pytest.mark.parametrize(
    ("mutate", "field", "hint"),
    [
        (lambda d: d["training"].update(max_stepz=3), "training.max_stepz", "unknown field"),
        (lambda d: d.pop("data"), "data", "required field is missing"),
        (
            lambda d: d["data"].update(splits={"train": 0.5, "validation": 0.1, "test": 0.1}),
            "data.splits",
            "sum to 1.0",
        ),
        (lambda d: d.update(name="Tiny_Llama"), "name", "lowercase"),
        (lambda d: d["training"].update(warmup_steps=10_000), "training", "warmup_steps"),
        (lambda d: d["evaluation"].update(thresholds={}), "evaluation.thresholds", "gate with no criteria"),
    ],
)
def test_invalid_recipe_names_file_field_and_fix(tmp_path, mutate, field, hint):
    data = _demo()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"`{field}`" in msg
    assert hint in msg


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
