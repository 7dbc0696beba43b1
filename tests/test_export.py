"""Compact export: transformers loading the exported checkpoint gives domex's restricted logits, every family."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from domex.runtime.export import INFO, export, kept_count
from domex.runtime.pool import Pool, build
from domex.runtime.families import restrict
from domex.errors import ExportError
from domex.store.mask import Mask
from tiny import FAMILIES, tiny_model, tokens

SIZES = {}  # family -> (source safetensors bytes, export safetensors bytes), printed at the end


def random_mask(num_layers: int, num_experts: int, k: int, seed: int = 0) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask.of(num_experts, [torch.randperm(num_experts, generator=g)[:k].tolist() for _ in range(num_layers)])


def group_balanced_mask(num_layers: int, num_experts: int, n_group: int, per_group: int, seed: int = 0) -> Mask:
    """`per_group` kept experts in each of `n_group` original groups: DeepSeek's grouping survives the export."""
    g = torch.Generator().manual_seed(seed)
    size = num_experts // n_group
    return Mask.of(num_experts, [[size * grp + i for grp in range(n_group) for i in torch.randperm(size, generator=g)[:per_group].tolist()]
                                 for _ in range(num_layers)])


def safetensors_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def source(tmp_path, family, **kw):
    model = tiny_model(family, **kw)
    model.save_pretrained(tmp_path / "model")
    build(tmp_path / "model", tmp_path / "pool", progress=False)
    return model, Pool(tmp_path / "pool")


def compact_logits(out_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model, model(ids).logits


def domex_logits(model, mask, ids):
    restrict(model, mask)
    with torch.no_grad():
        return model(ids).logits


def engine_logits(pool, mask, ids):
    """domex's Engine (pool + expert cache of K slots + restricted routing) on the same mask, if importable."""
    try:
        from domex.runtime.engine import Engine
    except ImportError:  # the Engine is being written alongside; the stock-model comparison still runs
        return None
    engine = Engine.open(pool, budget=str(kept_count(mask)))
    return engine.logits(ids, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_domex_logits(family, tmp_path):
    if family == "deepseek_v3":  # 16 experts in 4 groups, 2 kept per group (K=8): grouping kept, so logits are equal
        model, pool = source(tmp_path, family, num_experts=16)
        mask = group_balanced_mask(pool.manifest.num_layers, 16, 4, 2, seed=1)
    else:
        model, pool = source(tmp_path, family)
        mask = random_mask(pool.manifest.num_layers, 8, 4, seed=FAMILIES.index(family))
    engine_diff = float("nan")
    with pool:
        report = export(pool, mask, tmp_path / "out", provenance={"domains": ["test"]})
        ids = tokens()
        compact, got = compact_logits(tmp_path / "out", ids)
        want = domex_logits(model, mask, ids)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        via_engine = engine_logits(pool, mask, ids)
        if via_engine is not None:
            torch.testing.assert_close(got, via_engine, rtol=0, atol=1e-5)
            engine_diff = float((got - via_engine).abs().max())
    assert report.kept_per_layer == len(mask.layers[0]) and compact.config.num_experts_per_tok == 2
    info = json.loads((tmp_path / "out" / INFO).read_text())
    assert info["source_fingerprint"] == pool.fingerprint and info["domains"] == ["test"]
    assert [info["kept"][str(l)] for l in pool.manifest.moe_layers] == [list(k) for k in mask.layers]
    SIZES[family] = (safetensors_bytes(tmp_path / "model"), safetensors_bytes(tmp_path / "out"),
                     float((got - want).abs().max()), engine_diff)
    assert SIZES[family][1] < SIZES[family][0]
    assert not list(tmp_path.glob(".out.tmp-*"))  # temp folder renamed away


def test_deepseek_equal_group_counts_keep_grouping(tmp_path):
    """16 experts in 4 groups, 2 kept per group: renumbered groups are the original groups, routing is equal."""
    model, pool = source(tmp_path, "deepseek_v3", num_experts=16)
    mask = group_balanced_mask(pool.manifest.num_layers, 16, 4, 2, seed=2)
    with pool, warnings.catch_warnings():
        warnings.simplefilter("error")  # no grouping warning
        report = export(pool, mask, tmp_path / "out")
    assert report.grouping.kept and (report.grouping.n_group, report.grouping.topk_group) == (4, 2)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (8, 4, 2)
    ids = tokens()
    _, got = compact_logits(tmp_path / "out", ids)
    torch.testing.assert_close(got, domex_logits(model, mask, ids), rtol=0, atol=1e-5)


def test_deepseek_unequal_group_counts_disable_grouping_with_warning(tmp_path):
    model, pool = source(tmp_path, "deepseek_v3", num_experts=16)
    mask = Mask.of(16, [[0, 1, 2, 3, 4, 5, 8, 12]] * pool.manifest.num_layers)  # groups keep 4, 2, 1, 1
    with pool, pytest.warns(UserWarning, match="routing then differs|differs from the source"):
        report = export(pool, mask, tmp_path / "out")
    assert not report.grouping.kept and "not an equal number per group" in report.grouping.reason
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (8, 1, 1)
    # what the compact model computes: domex's restriction of the source with group-limited routing off
    model.config.n_group, model.config.topk_group = 1, 1
    ids = tokens()
    _, got = compact_logits(tmp_path / "out", ids)
    torch.testing.assert_close(got, domex_logits(model, mask, ids), rtol=0, atol=1e-5)


def test_non_uniform_mask_is_refused(tmp_path):
    _, pool = source(tmp_path, "qwen3_moe")
    mask = Mask.of(8, [[0, 1, 2, 3], [0, 1, 2]])
    with pool, pytest.raises(ExportError) as e:
        export(pool, mask, tmp_path / "out")
    assert "different number of experts per MoE layer (min 3, max 4)" in str(e.value)
    assert "vLLM and SGLang read a single num_experts" in str(e.value)
    assert not (tmp_path / "out").exists()
    assert kept_count(Mask.of(8, [[0, 1], [3, 4]])) == 2


def test_output_folder_in_use_is_refused(tmp_path):
    _, pool = source(tmp_path, "olmoe")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pool, pytest.raises(ExportError, match="exists and is not an empty folder"):
        export(pool, Mask.full(2, 8), tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep me"


def test_sizes_report():
    """Printed with -s: source vs export safetensors bytes (K=4 of E=8; DeepSeek K=8 of 16), max |logit diff|."""
    for family, (src, out, diff, engine) in SIZES.items():
        print(f"{family:12s} source {src:8d} B  export {out:8d} B  ({out / src:.1%})  "
              f"max|diff| vs restricted stock {diff:.2e}, vs Engine {engine:.2e}")


def test_cli_export_from_store_and_from_mask_file(tmp_path, capsys):
    """`domex export --store --domain --budget` keeps the domain's best experts; `--mask` the file's; coverage refused."""
    import numpy as np

    from domex.runtime.cli import main
    from domex.store.db import Store
    from domex.store.pattern import Pattern

    _, pool = source(tmp_path, "qwen2_moe")
    fp = pool.fingerprint
    pool.close()
    scores = np.tile(np.arange(8, dtype=np.float32), (2, 1))  # [L, E]: expert e scores e, so 50% keeps 4..7
    scores[1, 0] = 100.0  # layer 1 keeps 0, 5, 6, 7
    store = Store.open(tmp_path / "store", fingerprint=fp)
    store.register(Pattern(name="code", fingerprint=fp, scores={"easyep": scores}, tokens=10, demos=[{"text": "x"}],
                           embeddings=np.eye(1, 384, dtype=np.float32), settings={"top_k": 2}))
    store.close()
    args = ["export", "--pool", str(tmp_path / "pool"), "--store", str(tmp_path / "store"), "--domain", "code",
            "--budget", "50%"]
    assert main(args + [str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / INFO).read_text())
    assert info["kept"] == {"0": [4, 5, 6, 7], "1": [0, 5, 6, 7]}
    assert (info["domains"], info["criterion"], info["budget"]) == (["code"], "easyep", "50%")
    assert "K=4 of E=8" in capsys.readouterr().out

    Mask.of(8, [[1, 2, 3], [4, 5, 6]]).save(tmp_path / "mask.json")
    assert main(["export", "--pool", str(tmp_path / "pool"), "--mask", str(tmp_path / "mask.json"), str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_experts"] == 3

    assert main(args + ["--rule", "coverage", "--budget", "40%", str(tmp_path / "cov")]) == 2
    assert "needs one expert count for the whole model" in capsys.readouterr().err
