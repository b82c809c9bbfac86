"""Build the local tiny model that mars-serve runs on vLLM CPU.

Nothing is downloaded from a model hub: a recipe (``configs/model/tiny.yaml``,
or the defaults embedded in `ModelRecipe`) fixes a small Llama architecture
and a seed, and `build_model` writes a Hugging Face-format directory that
vLLM loads like any other model:

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
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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

    name: str = Field("mars-tiny-llama", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
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

    @field_validator("num_attention_heads")
    @classmethod
    def _heads_fit_hidden(cls, value: int, info: ValidationInfo) -> int:
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

    @field_validator("num_key_value_heads")
    @classmethod
    def _kv_heads_fit_heads(cls, value: int, info: ValidationInfo) -> int:
        heads = info.data.get("num_attention_heads")
        if heads is not None and heads % value:
            raise ValueError(f"must divide num_attention_heads ({heads})")
        return value

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def fingerprint(self) -> str:
        """Hash of the recipe and builder version: equal means same build."""
        payload = {"builder_version": BUILDER_VERSION, "recipe": self.model_dump(mode="json")}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------
# Loading recipes


def recipe_from_mapping(data: Any, source: str = "<recipe>") -> ModelRecipe:
    """Validate a parsed recipe; errors name `source` and each bad field."""
    return validate_mapping(
        ModelRecipe, data, source=source, what="model recipe", error=RecipeError
    )


def load_recipe(path: str | os.PathLike[str]) -> ModelRecipe:
    """Read and validate a YAML model recipe.

    Raises `RecipeError` (message starts with the file name and names every
    bad field) when the file is missing, not YAML, or not a valid recipe.
    """
    return load_yaml(ModelRecipe, path, what="model recipe", error=RecipeError)


def default_recipe() -> ModelRecipe:
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


def is_built(recipe: ModelRecipe, out_dir: str | os.PathLike[str]) -> bool:
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
    recipe: ModelRecipe,
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
    import tokenizers
    import torch
    import transformers

    return {
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
