"""The SVD core of the LoRA tools: rank rules, randomized accuracy, exact products, ulp counts."""
import io
import math

import pytest
import torch

from lora_ext.tools.common import rounding_step, ulp_distance
from lora_ext.tools.progress import _SimpleBar, progress
from lora_ext.tools.svd import RankError, choose_rank, factorize, factorize_product, randomized_svd
from tiny_models import one_thread_fixture


one_thread = one_thread_fixture()


def _known(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))[0]
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.T).float()


def test_rank_rules():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    total = float((s ** 2).sum())  # 85
    assert choose_rank(s, total, 3) == 3
    assert choose_rank(s, total, 10) == 4  # zero singular values are never kept
    assert choose_rank(s, total, 10, "ratio", ratio=4.0) == 3  # 8/4 = 2 >= 8/4
    assert choose_rank(s, total, 10, "energy", energy=64 / 85) == 1  # exactly reached
    assert choose_rank(s, total, 10, "energy", energy=0.94) == 2  # 80/85 = 0.941
    assert choose_rank(s, total, 10, "energy", energy=0.95) == 3  # 0.941 < 0.95 <= 84/85
    assert choose_rank(s, total, 1, "energy", energy=0.99) == 1  # the cap wins
    with pytest.raises(RankError):
        choose_rank(s, total, 3, "energy", energy=1.5)
    with pytest.raises(RankError):
        choose_rank(s, total, 3, "nope")


def test_randomized_svd_is_near_optimal_on_a_decaying_spectrum():
    s = [math.exp(-i / 8) for i in range(200)]
    d = _known(300, 900, s)
    f = factorize(d, 16, method="randomized")
    opt = math.sqrt(sum(x * x for x in s[16:]) / sum(x * x for x in s))
    assert f.method == "randomized" and f.rank == 16
    assert f.rel_error <= 1.02 * opt
    # the reported energy is exactly what the factors keep (they are a projection of d)
    err = float(torch.linalg.vector_norm(d - f.up @ f.down) ** 2 / torch.linalg.vector_norm(d) ** 2)
    assert abs(err - (1 - f.energy)) <= 1e-5
    u, sv, vh = randomized_svd(d, 8)
    assert torch.allclose(sv[:8], torch.tensor(s[:8]), rtol=1e-3)


def test_exact_low_rank_is_recovered_and_auto_picks_exact_for_small():
    d = _known(40, 90, [3.0, 2.0, 1.0])
    f = factorize(d, 8)
    assert f.method == "exact" and f.rank == 3  # rounding-level singular values are not kept
    assert torch.allclose(f.up @ f.down, d, atol=1e-5)
    f = factorize(torch.zeros(5, 7), 4)
    assert f.rank == 0 and f.energy == 1.0


def test_factorize_product_matches_the_dense_svd():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(50, 6, generator=g), torch.randn(6, 70, generator=g)
    f = factorize_product(p, q)  # lossless
    assert f.rank == 6 and torch.allclose(f.up @ f.down, p @ q, atol=1e-4)
    dense = torch.linalg.svdvals((p @ q).double())
    assert torch.allclose(f.s.double(), dense[:6], rtol=1e-5)
    f2 = factorize_product(p, q, 2)
    assert abs(f2.energy - float((dense[:2] ** 2).sum() / (dense ** 2).sum())) <= 1e-6
    # a sum that cancels is rank-deficient: zero values are dropped
    f3 = factorize_product(torch.cat([p, -p], 1), torch.cat([q, q], 0))
    assert f3.rank == 0


def test_ulp_distance_and_rounding_step():
    a = torch.tensor([1.0, -2.0, 0.0, 65504.0], dtype=torch.float16)
    b = torch.nextafter(a, torch.full_like(a, float("inf")))
    assert ulp_distance(a, b).tolist() == [1, 1, 1, 1]
    assert ulp_distance(torch.tensor([-0.0]), torch.tensor([0.0])).tolist() == [0]
    assert float(rounding_step(torch.tensor([1.0], dtype=torch.float16))) == 2.0 ** -10


def test_progress_bar_fallback_and_off():
    assert list(progress([1, 2, 3], enabled=False)) == [1, 2, 3]
    import sys

    old, sys.stderr = sys.stderr, io.StringIO()
    try:
        assert list(_SimpleBar(range(3), 3, "x")) == [0, 1, 2]
        assert "3/3" in sys.stderr.getvalue()
    finally:
        sys.stderr = old
