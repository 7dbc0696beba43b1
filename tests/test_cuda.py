"""The CUDA path of the expert cache: pool -> pinned staging (two halves) -> non-blocking copies into GPU slots,
with a fence before a half is reused. Skipped where no GPU exists; tools/accelerator_check.sh runs it on one."""

import pytest
import torch

from domex.runtime.cache import ExpertCache
from domex.runtime.engine import Engine
from domex.runtime.pool import Pool, build
from domex.store.mask import Mask
from tiny import tiny_checkpoint, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
E, L = 8, 2


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    build(tiny_checkpoint(root / "model", num_experts=E, num_layers=L), root / "pool", progress=False)
    return root / "pool"


def test_staged_loads_put_each_expert_in_its_slot(pool_dir):
    """A staging buffer of one expert per half: every load reuses a half, so a missing fence would corrupt slots."""
    with Pool(pool_dir) as pool:
        cache = ExpertCache(pool, E, "cuda", staging_bytes=2 * pool.manifest.expert_bytes)
        for mask in (Mask.of(E, [range(6)] * L), Mask.of(E, [range(2, 8)] * L), Mask.full(L, E)):
            cache.make_resident(mask)
            for l in range(L):
                for e in mask.layers[l]:
                    s = int(cache.slot_of[l][e])
                    for name, ref in pool.read_expert(l, e).items():
                        assert torch.equal(cache.slots[l][name][s].cpu(), ref), (l, e, name)


def test_gpu_engine_matches_the_cpu_engine(pool_dir):
    mask = Mask.of(E, [[0, 2, 4, 6]] * L)
    cpu, gpu = Engine.open(pool_dir, budget="4"), Engine.open(pool_dir, budget="4", device="cuda")
    diff = (cpu.logits(tokens(0), mask=mask) - gpu.logits(tokens(0), mask=mask).cpu()).abs().max().item()
    assert diff <= 1e-4, diff
