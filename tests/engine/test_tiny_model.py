"""The locally built tiny model: files, config, determinism, tokenizer, vLLM.

Builds need torch and transformers (a few seconds each); one test starts a
real vLLM CPU engine in a subprocess (in-process engine core, ~25 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workers.model_builder import (
    MARKER_FILE,
    REQUIRED_FILES,
    ModelRecipe,
    build_model,
    is_built,
    load_recipe,
    read_build_marker,
)

pytestmark = pytest.mark.engine

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "model" / "tiny.yaml"

ROUND_TRIP_TEXTS = [
    "hello world",
    "Hello, wörld! 12 * (3 + 4) = 84",
    '{"name": "search", "arguments": {"query": "weather"}}',
    "tabs\tand\nnewlines  and  double  spaces ",
    "emoji 😀 and CJK 漢字 and accents éàü",
    "",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _quiet(_: str) -> None:
    pass


def test_build_has_hf_files_and_marker(tiny_model_dir):
    for name in (*REQUIRED_FILES, MARKER_FILE):
        assert (tiny_model_dir / name).is_file(), name
    recipe = load_recipe(TINY)
    assert is_built(recipe, tiny_model_dir)
    marker = read_build_marker(tiny_model_dir)
    assert marker["fingerprint"] == recipe.fingerprint()
    assert marker["files"]["model.safetensors"] == _sha256(tiny_model_dir / "model.safetensors")


def test_config_values(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    expected = {
        "hidden_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "tie_word_embeddings": False,
    }
    assert {key: config[key] for key in expected} == expected
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_weights_match_the_recipe(tiny_model_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    assert tensors["model.embed_tokens.weight"].shape == (512, 128)
    assert tensors["lm_head.weight"].shape == (512, 128)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (64, 128)
    assert tensors["model.layers.1.mlp.gate_proj.weight"].shape == (256, 128)
    assert "model.layers.2.mlp.gate_proj.weight" not in tensors
    assert {str(t.dtype) for t in tensors.values()} == {"torch.bfloat16"}
    std = tensors["model.embed_tokens.weight"].float().std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02


def test_same_seed_gives_identical_bytes(tmp_path, tiny_model_dir):
    recipe = load_recipe(TINY)
    first = build_model(recipe, tmp_path / "a", log=_quiet)
    second = build_model(recipe, tmp_path / "b", log=_quiet)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(first / name) == _sha256(second / name), name
    # ...and the same as the session's cached build of that recipe.
    assert _sha256(first / "model.safetensors") == _sha256(tiny_model_dir / "model.safetensors")


def test_another_seed_gives_other_weights(tmp_path, tiny_model_dir):
    other = build_model(ModelRecipe(seed=1), tmp_path / "seed1", log=_quiet)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_model_dir / "model.safetensors")


def test_rebuild_is_skipped_forced_or_replaced(tmp_path):
    out = tmp_path / "m"
    lines: list[str] = []
    recipe = ModelRecipe()
    build_model(recipe, out, log=lines.append)
    weights = _sha256(out / "model.safetensors")

    lines.clear()
    assert build_model(recipe, out, log=lines.append) == out.resolve()
    assert len(lines) == 1 and "skipping" in lines[0]

    lines.clear()
    build_model(recipe, out, force=True, log=lines.append)
    assert any("forced rebuild" in line for line in lines)
    assert _sha256(out / "model.safetensors") == weights

    lines.clear()
    build_model(ModelRecipe(seed=3), out, log=lines.append)
    assert any("different or incomplete build" in line for line in lines)
    assert read_build_marker(out)["recipe"]["seed"] == 3
    assert _sha256(out / "model.safetensors") != weights
    # No staging or retired directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["m"]


def test_tokenizer_round_trip_and_special_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert len(tokenizer) == 512
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id) == (0, 1)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 3)
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # BPE merges learned from the generated corpus actually compress text.
    assert len(tokenizer.encode("the people", add_special_tokens=False)) < len("the people")


def test_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "2 + 2?"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>system: be brief\nuser: 2 + 2?\nassistant: "
    # Appending turns only extends the prompt (a resumed session keeps its prefix).
    longer = [*messages, {"role": "assistant", "content": "4"}, {"role": "tool", "content": "ok"}]
    extended = tokenizer.apply_chat_template(longer, tokenize=False, add_generation_prompt=True)
    assert extended.startswith(prompt)


_VLLM_CHECK = textwrap.dedent(
    """
    import json, sys, time
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        started = time.perf_counter()
        llm = LLM(model=sys.argv[1], max_model_len=2048, block_size=32, enforce_eager=True,
                  kv_cache_memory_bytes=64 * 2**20, seed=0)
        init_s = time.perf_counter() - started
        greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        out = llm.generate(["hello world", "hello world"], greedy)
        chat = llm.chat([{"role": "user", "content": "what is 2 + 2?"}], greedy)
        tok = llm.get_tokenizer()
        text = "Hello, wörld! 12 * (3 + 4) = 84"
        print("RESULT " + json.dumps({
            "init_s": init_s,
            "prompt_ids": list(out[0].prompt_token_ids),
            "gen": [list(o.outputs[0].token_ids) for o in out],
            "chat_prompt": chat[0].prompt,
            "chat_prompt_ids": list(chat[0].prompt_token_ids),
            "chat_gen": list(chat[0].outputs[0].token_ids),
            "round_trip": tok.decode(tok.encode(text), skip_special_tokens=True) == text,
        }))
    """
)


@pytest.mark.timeout(180)
def test_vllm_cpu_generates_and_chats(tiny_model_dir):
    # The engine core runs in the child process itself (no extra engine and
    # worker processes: ~3 s init instead of ~30 s on 2 cores); the child
    # keeps vLLM's thread binding and global state out of the pytest process.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_CHECK, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
        cwd=REPO_ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["prompt_ids"][0] == 1  # one <s>, added by the tokenizer
    assert result["prompt_ids"].count(1) == 1
    assert len(result["gen"][0]) == 8
    assert result["gen"][0] == result["gen"][1]  # greedy is deterministic
    assert all(0 <= t < 512 for t in result["gen"][0])
    assert result["chat_prompt"] == "<s>user: what is 2 + 2?\nassistant: "
    assert result["chat_prompt_ids"].count(1) == 1  # the template's <s>, not a second one
    assert len(result["chat_gen"]) == 8
    assert result["round_trip"]
