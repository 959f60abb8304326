"""server/engine/sampling.py: inverse-CDF draws."""

from __future__ import annotations

import torch

from server.engine.sampling import draw


def test_draw_follows_the_distribution_and_never_picks_zero_mass() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(4000):
        counts[draw(probs, g)] += 1
    assert counts[[0, 2, 5]].sum() == 0
    # 4000 draws: each frequency within ~4.5 standard deviations of its probability
    assert torch.allclose(counts / 4000, probs, atol=0.035), counts / 4000
    again = torch.Generator().manual_seed(0)
    first = [draw(probs, again) for _ in range(20)]
    g2 = torch.Generator().manual_seed(0)
    assert [draw(probs, g2) for _ in range(20)] == first
    # a one-hot distribution, also in half precision
    assert draw(torch.tensor([0, 0, 1, 0], dtype=torch.bfloat16), g) == 2
