"""Expert pool: both on-disk expert layouts, sharded checkpoints, the manifest, and every refusal.

Tiny random models of each family are saved with save_pretrained (per-expert keys by default,
fused keys with save_original_format=False) and converted; the pool's model must equal the stock one.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from domex.runtime.families import adapter_for
from domex.runtime.checkpoint import fingerprint
from domex.runtime.pool import MANIFEST, Pool, PoolManifest, build, load_full_model
from domex.errors import FingerprintMismatch, PoolError
from tiny import FAMILIES, tiny_model, tokens

WORDS = "the a cat dog sat ran on in mat park sun rain big small red blue one two three and".split()
CHAT = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}</s> {% endif %}"


def save_tokenizer(path) -> None:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT
    fast.save_pretrained(path)


def saved_model(path, family, seed=0, *, fused=False, tokenizer=False, **save_kw):
    """A tiny random model of `family` saved to `path` (per-expert keys unless fused); returns the model."""
    model = tiny_model(family, seed=seed)
    model.save_pretrained(path, save_original_format=not fused, **save_kw)
    if tokenizer:
        save_tokenizer(path)
    return model


def stock(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model, seed=0):
    with torch.no_grad():
        return model(tokens(seed)).logits


CASES = [(f, False) for f in FAMILIES] + [("qwen3_moe", True), ("mixtral", True), ("deepseek_v3", True)]


@pytest.mark.parametrize("family, fused", CASES)
def test_pool_model_equals_stock(tmp_path, family, fused):
    model = saved_model(tmp_path / "model", family, fused=fused)
    manifest = build(tmp_path / "model", tmp_path / "pool", progress=False)
    layout = "fused" if fused or family == "gpt_oss" else "per_expert"
    assert manifest.source_layout == layout
    full = load_full_model(tmp_path / "pool")
    diff = (logits(full) - logits(stock(tmp_path / "model"))).abs().max().item()
    print(f"{family} {layout} max_abs_diff={diff:.3g}")
    assert diff <= 1e-5
    # expert e of every layer, read alone, is slice [e] of the in-memory fused parameters
    adapter = adapter_for(model.config)
    with Pool(tmp_path / "pool") as pool:
        for l, (_, block) in enumerate(adapter.moe_blocks(model)):
            for e in (0, manifest.num_experts - 1):
                for name, t in pool.read_expert(l, e).items():
                    assert torch.equal(t, getattr(block.experts, name)[e]), (l, e, name)


def test_layer_files_are_expert_major_safetensors(tmp_path):
    saved_model(tmp_path / "model", "qwen3_moe")
    m = build(tmp_path / "model", tmp_path / "pool", progress=False)
    with safe_open(tmp_path / "pool" / m.layer_files[1], "pt") as f:
        assert f.metadata()["domex_fingerprint"] == m.fingerprint
        assert len(list(f.keys())) == m.num_experts * len(m.expert_params)
    raw = (tmp_path / "pool" / m.layer_files[1]).read_bytes()
    with Pool(tmp_path / "pool") as pool:
        e = 5
        record = raw[m.offset(1, e): m.offset(1, e) + m.expert_bytes]  # one contiguous range per expert
        expert = pool.read_expert(1, e)
        assert record == b"".join(expert[p.name].numpy().tobytes() for p in m.expert_params)
    assert m.data_start[1] % 4096 == 0
    data = json.loads((tmp_path / "pool" / MANIFEST).read_text())
    assert data["format"] == "domex-expert-pool" and data["version"] == 1
    assert PoolManifest.from_dir(tmp_path / "pool") == m


def test_sharded_checkpoint_gives_the_same_pool(tmp_path):
    saved_model(tmp_path / "one", "olmoe")
    saved_model(tmp_path / "sharded", "olmoe", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = build(tmp_path / "one", tmp_path / "pool_a", progress=False)
    b = build(tmp_path / "sharded", tmp_path / "pool_b", progress=False)
    assert a.fingerprint == b.fingerprint and a.checksums == b.checksums
    assert torch.equal(logits(load_full_model(tmp_path / "pool_b")), logits(stock(tmp_path / "one")))


def test_fingerprint_names_the_model(tmp_path):
    saved_model(tmp_path / "a", "qwen3_moe", seed=0)
    saved_model(tmp_path / "a_fused", "qwen3_moe", seed=0, fused=True)
    saved_model(tmp_path / "b", "qwen3_moe", seed=1)
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "a")
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")  # same shapes, other weights
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "a_fused")  # other tensor names


def test_copies_config_and_tokenizer(tmp_path):
    saved_model(tmp_path / "model", "mixtral", tokenizer=True)
    build(tmp_path / "model", tmp_path / "pool", progress=False)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "model" / name).read_bytes()
    assert not list((tmp_path / "pool").rglob("*.tmp"))


@pytest.fixture
def pool_dir(tmp_path):
    saved_model(tmp_path / "model", "qwen3_moe")
    build(tmp_path / "model", tmp_path / "pool", progress=False)
    return tmp_path / "pool"


def test_flipped_byte_is_refused_by_checksum(pool_dir):
    m = PoolManifest.from_dir(pool_dir)
    path = pool_dir / m.layer_files[1]
    raw = bytearray(path.read_bytes())
    raw[m.offset(1, 3) + 100] ^= 0x01
    path.write_bytes(raw)
    with Pool(pool_dir) as pool:
        pool.read_expert(1, 2)  # its neighbours are fine
        with pytest.raises(PoolError, match=r"layer_001.safetensors: MoE layer 1 \(decoder layer 1\), expert 3: checksum"):
            pool.read_expert(1, 3)
    with pytest.raises(PoolError, match="expert 3: checksum .* rebuild it with `domex pool build"):
        load_full_model(pool_dir)


def test_missing_file_is_refused(pool_dir):
    os.remove(pool_dir / "experts" / "layer_000.safetensors")
    with pytest.raises(PoolError, match=r"layer_000.safetensors: pool file missing; .* rebuild it"):
        Pool(pool_dir)
    os.remove(pool_dir / MANIFEST)
    with pytest.raises(PoolError, match="no manifest.json, so this is not an expert pool"):
        Pool(pool_dir)
    with pytest.raises(PoolError, match="no such pool folder"):
        Pool(pool_dir / "nope")


def test_truncated_file_is_refused(pool_dir):
    path = pool_dir / "experts" / "layer_001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PoolError, match=r"layer_001.safetensors: \d+ bytes, the manifest says \d+; the file is truncated"):
        Pool(pool_dir)


def test_files_of_another_model_are_refused(tmp_path, pool_dir):
    saved_model(tmp_path / "other", "qwen3_moe", seed=7)  # same shapes, other weights
    build(tmp_path / "other", tmp_path / "other_pool", progress=False)
    shutil.copyfile(tmp_path / "other_pool" / "experts" / "layer_001.safetensors", pool_dir / "experts" / "layer_001.safetensors")
    with pytest.raises(FingerprintMismatch, match="layer_001.safetensors: written for model fingerprint .* the pool mixes files of two models"):
        Pool(pool_dir)


def test_pattern_of_another_model_is_refused(tmp_path, pool_dir):
    saved_model(tmp_path / "other", "qwen3_moe", seed=7)
    with Pool(pool_dir) as pool:
        pool.check_fingerprint(fingerprint(tmp_path / "model"), "pattern 'law'")
        with pytest.raises(FingerprintMismatch, match="pattern 'law' was made for model fingerprint .* use the pool built from the same model"):
            pool.check_fingerprint(fingerprint(tmp_path / "other"), "pattern 'law'")


def test_build_refuses_a_pool_in_use_and_a_foreign_folder(tmp_path, pool_dir):
    with Pool(pool_dir):
        with pytest.raises(PoolError, match="the pool is open for serving .* build into another POOL_DIR"):
            build(tmp_path / "model", pool_dir, progress=False)
    build(tmp_path / "model", pool_dir, progress=False)  # closed: rebuilding in place is fine
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(PoolError, match="is not empty and is not an expert pool"):
        build(tmp_path / "model", tmp_path / "stuff", progress=False)


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoolError, match="no config.json"):
        build(tmp_path / "empty", tmp_path / "pool", progress=False)
