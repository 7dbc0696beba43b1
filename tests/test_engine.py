"""Engine over an expert pool: equals stock transformers (all experts, and restricted), reads only
missing experts when switching, refuses what does not fit, generates like transformers."""

import os
import random

import pytest
import torch

from domex.runtime import pool as pool_module
from domex.runtime.cli import main as cli_main
from domex.runtime.engine import Engine
from domex.runtime.pool import build
from domex.runtime.families import restrict
from domex.errors import CacheTooSmall, FingerprintMismatch, MaskError
from domex.store.mask import Mask
from test_pool import saved_model, stock
from tiny import FAMILIES, tokens

E, L = 8, 2  # tiny models: 8 routed experts, 2 MoE layers


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """family -> (model dir, pool dir), built once for the module."""
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for family in FAMILIES:
        saved_model(root / family, family, seed=3, tokenizer=family == "qwen3_moe")
        build(root / family, root / f"{family}_pool", progress=False)
        out[family] = (root / family, root / f"{family}_pool")
    return out


def random_mask(seed, keep):
    rng = random.Random(seed)
    return Mask.of(E, [rng.sample(range(E), keep) for _ in range(L)])


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_equal_stock(pools, family, device):
    model_dir, pool_dir = pools[family]
    engine = Engine.open(pool_dir, device=device)
    ours = engine.logits(tokens(0), mask=Mask.full(L, E)).cpu()
    with torch.no_grad():
        ref = stock(model_dir)(tokens(0)).logits
    diff = (ours - ref).abs().max().item()
    print(f"{family} all experts max_abs_diff={diff:.3g}")
    assert diff <= 1e-5
    engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_equal_restricted_stock(pools, family, device):
    model_dir, pool_dir = pools[family]
    engine = Engine.open(pool_dir, budget="5", device=device)  # S=5 < E: slots are reused across the masks
    ref = stock(model_dir)
    for seed, keep in [(0, 4), (1, 5), (2, 2), (0, 4)]:
        mask = random_mask(seed, keep)
        ours = engine.logits(tokens(seed), mask=mask).cpu()
        restrict(ref, mask)
        with torch.no_grad():
            diff = (ours - ref(tokens(seed)).logits).abs().max().item()
        print(f"{family} keep={keep} max_abs_diff={diff:.3g}")
        assert diff <= 1e-5
    engine.close()


def test_experts_are_the_slot_buffers(pools):
    engine = Engine.open(pools["qwen2_moe"][1], budget="50%")
    adapter = engine.pool.adapter
    for (_, block), slots in zip(adapter.moe_blocks(engine.model), engine.cache.slots):
        assert block.experts.num_experts == 4
        for name, buf in slots.items():
            param = getattr(block.experts, name)
            assert param.shape[0] == 4 and param.data_ptr() == buf.data_ptr()
    assert engine.cache.slot_bytes() == L * 4 * engine.pool.manifest.expert_bytes
    engine.close()


def expert_bytes(config):
    """Bytes of one Qwen3-MoE expert from the config alone: gate_up [2I, H] + down [H, I], fp32."""
    return 3 * config.moe_intermediate_size * config.hidden_size * 4


@pytest.mark.parametrize("slots", [4, 8])
def test_switch_reads_only_missing_experts(pools, monkeypatch, slots):
    model_dir, pool_dir = pools["qwen3_moe"]
    engine = Engine.open(pool_dir, budget=str(slots))
    nbytes = expert_bytes(engine.model.config)
    read = []
    real_preadv = os.preadv
    monkeypatch.setattr(pool_module.os, "preadv", lambda fd, bufs, off: read.append(real_preadv(fd, bufs, off)) or read[-1])
    a = Mask.of(E, [[0, 1, 2, 3], [4, 5, 6, 7]])
    b = Mask.of(E, [[2, 3, 4, 5], [0, 1, 6, 7]])
    only_b = sum(len(set(x) - set(y)) for x, y in zip(b.layers, a.layers))  # 2 + 2
    only_a = sum(len(set(x) - set(y)) for x, y in zip(a.layers, b.layers))
    steps = [(a, 8, 0, 0), (b, only_b, 8 - only_b, only_b if slots == 4 else 0),
             (a, only_a if slots == 4 else 0, 8 - only_a if slots == 4 else 8, only_a if slots == 4 else 0)]
    for mask, loaded, reused, evicted in steps:
        read.clear()
        report = engine.ensure(mask)
        assert (report.loaded, report.reused, report.evicted) == (loaded, reused, evicted)
        assert report.bytes_read == sum(read) == loaded * nbytes
        assert len(read) == loaded  # one read per expert
    stats = engine.stats()
    assert stats.misses == 8 + only_b + (only_a if slots == 4 else 0)
    assert stats.bytes_read == stats.misses * nbytes
    assert stats.resident_experts == (8 if slots == 4 else 12)
    engine.close()


def test_lru_evicts_the_least_recently_needed(pools):
    engine = Engine.open(pools["qwen3_moe"][1], budget="3")
    for kept in ([0, 1], [0, 2], [0, 3]):  # 3 slots: 3 replaces 1, needed longest ago (2 was needed later)
        engine.ensure(Mask.of(E, [kept, kept]))
    assert engine.cache.resident().layers == ((0, 2, 3), (0, 2, 3))
    assert engine.cache.last_report.evicted == 2
    engine.close()


def test_mask_larger_than_the_budget_is_refused(pools):
    engine = Engine.open(pools["olmoe"][1], budget="50%")
    mask = Mask.of(E, [[0, 1, 2], [0, 1, 2, 3, 4, 5]])
    with pytest.raises(CacheTooSmall, match=r"keeps 6 experts in MoE layer 1 \(decoder layer 1\) but the expert cache has "
                                            r"S=4 slots per layer \(budget '50%'\); raise the budget to at least 6 .*--budget 6"):
        engine.ensure(mask)
    assert engine.stats().misses == 0  # refused before reading anything
    with pytest.raises(MaskError, match="no experts are resident yet: pass mask="):
        engine.logits(tokens(0))
    with pytest.raises(FingerprintMismatch, match="the given fingerprint was made for model fingerprint"):
        Engine.open(pools["olmoe"][1], fingerprint="0" * 64)
    engine.close()


def test_budget_in_bytes(pools):
    engine = Engine.open(pools["qwen3_moe"][1], budget=f"{3 * L * expert_bytes(stock(pools['qwen3_moe'][0]).config)}B")
    assert engine.cache.num_slots == 3
    engine.close()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_greedy_generate_equals_stock(pools, family, device):
    model_dir, pool_dir = pools[family]
    engine = Engine.open(pool_dir, device=device)
    ids = tokens(1, batch=2, length=6)
    ours = engine.generate(ids, mask=Mask.full(L, E), max_new_tokens=8, do_sample=False).cpu()
    again = engine.generate(ids, max_new_tokens=8, do_sample=False).cpu()
    ref = stock(model_dir).generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, again) and torch.equal(ours, ref)
    engine.close()


def test_text_generate_with_and_without_chat_template(pools):
    model_dir, pool_dir = pools["qwen3_moe"]
    engine = Engine.open(pool_dir, budget="6")
    mask = random_mask(4, 6)
    ref = stock(model_dir)
    restrict(ref, mask)
    tok = engine.tokenizer
    for chat, text in [(False, "the cat sat on the mat"), (True, "the cat sat on the mat")]:
        out = engine.generate([text, "a big red dog"], mask=mask, chat_template=chat, max_new_tokens=6, do_sample=False)
        assert out == engine.generate([text, "a big red dog"], chat_template=chat, max_new_tokens=6, do_sample=False)
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True) if chat else text
        enc = tok([prompt], return_tensors="pt", add_special_tokens=not chat)
        ids = ref.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out[0] == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    engine.close()


def test_cli_generate(pools, tmp_path, capsys):
    model_dir, pool_dir = pools["qwen3_moe"]
    random_mask(5, 4).save(tmp_path / "mask.json")
    assert cli_main(["generate", "--pool", str(pool_dir), "--mask", str(tmp_path / "mask.json"),
                     "--max-new-tokens", "4", "the cat"]) == 0
    out = capsys.readouterr()
    assert "8 experts loaded" in out.err and "4 slots per layer" in out.err
    assert cli_main(["generate", "--pool", str(pool_dir), "--mask", str(tmp_path / "mask.json"), "--budget", "2",
                     "the cat"]) == 2
    assert "raise the budget to at least 4" in capsys.readouterr().err


def test_padded_batch_generate_with_a_training_config(tmp_path):
    """A checkpoint saved with output_router_logits=True (as training leaves it) still serves padded batches."""
    from tiny import tiny_checkpoint

    model_dir = tiny_checkpoint(tmp_path / "model")
    config = (model_dir / "config.json").read_text().replace('"output_router_logits": false', '"output_router_logits": true')
    assert '"output_router_logits": true' in config
    (model_dir / "config.json").write_text(config)
    build(model_dir, tmp_path / "pool", progress=False)
    engine = Engine.open(tmp_path / "pool", budget="4")
    mask = random_mask(6, 4)
    prompts = ["short", "a much longer prompt than the first"]
    batched = engine.generate(prompts, mask=mask, chat_template=False, max_new_tokens=5, do_sample=False)
    assert batched[1] == engine.generate(prompts[1], chat_template=False, max_new_tokens=5, do_sample=False)[0]
    engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_engine_equals_skipping_stock_and_counts_the_calls(pools, family, device):
    """Slots hold the experts and a sentinel slot takes the dropped pairs; stock+restrict(skip) is the
    reference (itself checked against a per-token router in test_routing)."""
    model_dir, pool_dir = pools[family]
    engine = Engine.open(pool_dir, budget="5", device=device, skip_ratio=0.5)
    ref = stock(model_dir)
    mask = random_mask(4, 5)
    ours = engine.logits(tokens(4), mask=mask).cpu()
    restrict(ref, mask, skip_ratio=0.5)
    with torch.no_grad():
        assert (ours - ref(tokens(4)).logits).abs().max().item() <= 1e-5
    stats = engine.stats()
    routers = [engine.pool.adapter.router(b) for _, b in engine.pool.adapter.moe_blocks(ref)]
    assert stats.expert_calls == sum(r.domex_calls for r in routers) == tokens(4).numel() * L * ref.config.num_experts_per_tok
    assert 0 < stats.expert_calls_skipped == sum(int(r.domex_skipped) for r in routers)
    engine.close()
    off = Engine.open(pool_dir, budget="5", device=device)
    assert off.stats().expert_calls_skipped == 0
    off.close()
