"""Model recipe validation and the `mars-serve model build` CLI's error paths.

No torch, transformers or vLLM here: every case fails before a build starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import cli
from workers.model_builder import (
    CPU_ATTENTION_HEAD_SIZES,
    DEFAULT_RECIPE_PATH,
    BuildError,
    ModelRecipe,
    RecipeError,
    build_model,
    default_recipe,
    load_recipe,
    recipe_from_mapping,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "model" / "tiny.yaml"


def _tiny_data() -> dict:
    return yaml.safe_load(TINY.read_text())


def _write(tmp_path: Path, data: object, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _error(tmp_path: Path, data: object) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    message = str(excinfo.value)
    assert message.startswith(str(path)), message  # names the file
    return message


def _with(**changes: object) -> dict:
    data = _tiny_data()
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__")
            data[outer][inner] = value
        else:
            data[key] = value
    return data


# --- the shipped recipe -----------------------------------------------------


def test_shipped_recipe_is_the_embedded_default():
    assert DEFAULT_RECIPE_PATH == TINY
    assert load_recipe(TINY) == ModelRecipe()
    assert default_recipe() == ModelRecipe()


def test_shipped_recipe_values():
    recipe = load_recipe(TINY)
    assert recipe.architecture == "LlamaForCausalLM"
    assert (recipe.hidden_size, recipe.num_attention_heads, recipe.num_key_value_heads) == (
        128,
        2,
        1,
    )
    assert recipe.head_dim == 64 and recipe.head_dim in CPU_ATTENTION_HEAD_SIZES
    assert (recipe.num_hidden_layers, recipe.intermediate_size, recipe.vocab_size) == (2, 256, 512)
    assert recipe.max_position_embeddings == 4096
    assert recipe.seed == 0
    assert recipe.dtype == "bfloat16"
    assert recipe.tokenizer.special_tokens == ["<unk>", "<s>", "</s>", "<pad>"]
    assert "add_generation_prompt" in recipe.tokenizer.chat_template


def test_fingerprint_tracks_every_field():
    base = ModelRecipe()
    assert base.fingerprint() == ModelRecipe().fingerprint()
    assert base.fingerprint() != ModelRecipe(seed=1).fingerprint()
    assert base.fingerprint() != ModelRecipe(dtype="float32").fingerprint()
    other_tok = ModelRecipe.model_validate({"tokenizer": {"corpus_sentences": 6000}})
    assert base.fingerprint() != other_tok.fingerprint()


# --- errors name the field (and the file) ----------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"hidden_size": "big"}, "hidden_size", "integer"),
        ({"hidden_size": 16}, "hidden_size", "greater than or equal to 32"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"dtype": "int8"}, "dtype", "bfloat16"),
        ({"architecture": "GPT2LMHeadModel"}, "architecture", "LlamaForCausalLM"),
        ({"vocab_size": 100}, "vocab_size", "260"),
        ({"num_hidden_layers": 0}, "num_hidden_layers", "greater than or equal to 1"),
        ({"max_position_embeddings": 10}, "max_position_embeddings", "64"),
        ({"rms_norm_eps": 0}, "rms_norm_eps", "greater than 0"),
        ({"name": "has space"}, "name", "pattern"),
        # hidden 128 / 8 heads = head_dim 16: vLLM's CPU attention rejects it.
        ({"num_attention_heads": 8}, "num_attention_heads", "head_dim 16"),
        ({"num_attention_heads": 3}, "num_attention_heads", "must divide hidden_size (128)"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "must divide num_attention_heads"),
        ({"tokenizer__min_frequency": 0}, "tokenizer.min_frequency", "greater than or equal"),
        ({"tokenizer__corpus_sentences": 5}, "tokenizer.corpus_sentences", "100"),
        ({"tokenizer__type": "wordpiece"}, "tokenizer.type", "byte_level_bpe"),
        ({"tokenizer__eos_token": "<s>"}, "tokenizer.eos_token", "must differ from bos_token"),
        ({"tokenizer__pad_token": ""}, "tokenizer.pad_token", "at least 1"),
    ],
)
def test_invalid_field_is_named(tmp_path, changes, field, hint):
    message = _error(tmp_path, _with(**changes))
    assert f"  - {field}: " in message, message
    assert hint in message, message


def test_unknown_fields_are_named_with_allowed_ones(tmp_path):
    message = _error(tmp_path, _with(hiden_size=128, tokenizer__vocab=5))
    assert "2 error(s)" in message
    assert "  - hiden_size: unknown field (allowed: " in message
    assert "hidden_size" in message.split("hiden_size")[1]
    assert "  - tokenizer.vocab: unknown field (allowed: add_bos_token, bos_token," in message


def test_every_bad_field_is_reported_at_once(tmp_path):
    message = _error(tmp_path, _with(seed=-5, dtype="fp4", num_hidden_layers=0))
    for field in ("seed", "dtype", "num_hidden_layers"):
        assert f"  - {field}: " in message


def test_partial_recipe_takes_defaults(tmp_path):
    recipe = load_recipe(_write(tmp_path, {"seed": 7, "dtype": "float32"}))
    assert recipe.seed == 7 and recipe.dtype == "float32"
    assert recipe.hidden_size == ModelRecipe().hidden_size


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("hidden_size: [128\n", "not valid YAML"),
        ("", "empty"),
        ("- 1\n- 2\n", "must be a mapping of fields, got list"),
        ("just a string\n", "must be a mapping of fields, got str"),
    ],
)
def test_unusable_files(tmp_path, text, hint):
    assert hint in _error(tmp_path, text)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=r"nope\.yaml: model recipe not found"):
        load_recipe(path)


def test_recipe_from_mapping_names_the_source():
    with pytest.raises(RecipeError, match=r"^serve.yaml: .*\n  - seed: "):
        recipe_from_mapping({"seed": "x"}, source="serve.yaml")


def test_recipe_is_immutable():
    recipe = ModelRecipe()
    with pytest.raises(ValueError, match="frozen"):
        recipe.seed = 3  # type: ignore[misc]


def test_build_refuses_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(BuildError, match="holds no mars-serve model build"):
            build_model(ModelRecipe(), foreign, force=force, log=lambda _: None)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_build_refuses_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(BuildError, match="not a directory"):
        build_model(ModelRecipe(), target, log=lambda _: None)


# --- the CLI: exit code 2, one clear line, no traceback ---------------------


def test_cli_bad_recipe_exits_2(tmp_path, capsys):
    recipe = _write(tmp_path, _with(num_key_value_heads=3))
    code = cli.main(["model", "build", "--recipe", str(recipe), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"mars-serve: error: {recipe}: invalid model recipe")
    assert "num_key_value_heads: must divide num_attention_heads" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_cli_missing_recipe_exits_2(tmp_path, capsys):
    code = cli.main(["model", "build", "--recipe", str(tmp_path / "x.yaml"), "--out", "m"])
    assert code == 2
    assert "x.yaml: model recipe not found" in capsys.readouterr().err


def test_cli_foreign_out_dir_exits_2(tmp_path, capsys):
    (tmp_path / "data.bin").write_bytes(b"\0")
    code = cli.main(["model", "build", "--out", str(tmp_path)])
    assert code == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["model"],
        ["model", "build"],  # --out is required
        ["model", "fly", "--out", "x"],
        ["nonsense"],
    ],
)
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    assert "usage: mars-serve" in capsys.readouterr().err


def test_cli_help_lists_model_build(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["model", "build", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "--recipe" in out and "--out" in out and "--force" in out
