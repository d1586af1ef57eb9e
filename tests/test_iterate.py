"""The alignment steps of I-LSR on tiny problems with known answers."""

from __future__ import annotations

import torch

from lsr_cli import Config
from lsr_cli.models import MLP
from lsr_cli.pde.iterate import gauss_newton_fit

FIT_GAIN = 100.0  # a reachable target (another set of weights of the same net) must be fitted far better


def test_gauss_newton_fit_reaches_a_reachable_target():
    torch.manual_seed(0)
    net = MLP(2, 1, hidden=[10, 10]).double().eval()
    teacher = MLP(2, 1, hidden=[10, 10]).double().eval()
    with torch.no_grad():
        for p, q in zip(teacher.parameters(), net.parameters(), strict=True):
            p.copy_(q + 0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype))
    x = torch.rand(300, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        target = teacher(x).reshape(-1)
        before = torch.linalg.norm(net(x).reshape(-1) - target)
    cfg = Config()
    cfg.iterate.gauss_newton_steps = 20
    cfg.iterate.gauss_newton_rank = 200
    steps = gauss_newton_fit(net, x, target, cfg, torch.Generator().manual_seed(3))
    with torch.no_grad():
        after = torch.linalg.norm(net(x).reshape(-1) - target)
    assert steps >= 1
    assert after < before / FIT_GAIN


def test_gauss_newton_fit_never_increases_the_misfit():
    torch.manual_seed(0)
    net = MLP(1, 1, hidden=[6]).double().eval()
    x = torch.linspace(-1, 1, 50, dtype=torch.float64)[:, None]
    target = torch.sign(x).reshape(-1)  # not representable: only decreases are accepted
    with torch.no_grad():
        before = torch.linalg.norm(net(x).reshape(-1) - target)
    cfg = Config()
    cfg.iterate.gauss_newton_steps = 5
    cfg.iterate.gauss_newton_rank = 10
    gauss_newton_fit(net, x, target, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.linalg.norm(net(x).reshape(-1) - target) <= before
