"""Per-image seeds: samples do not depend on the batch size; different seeds give different samples."""

import torch

from common.sample import StackedRandomGenerator, generate, image_seeds
from methods.teacher import EDMDenoiser, EDMTeacher


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, t, s=None, labels=None, return_logvar=False):
        return self.lin(torch.cat([x, t[:, None]], 1))


def test_batch_size_does_not_change_samples():
    model = EDMDenoiser(TinyNet())
    kw = dict(item_shape=(2,), n=23, steps=3, seed=7, device=torch.device("cpu"))
    a, za, _ = generate(EDMTeacher(), model, batch_size=5, **kw)
    b, zb, _ = generate(EDMTeacher(), model, batch_size=23, **kw)
    assert torch.equal(za, zb)
    assert torch.allclose(a, b, atol=1e-6)
    c, _, _ = generate(EDMTeacher(), model, batch_size=23, **{**kw, "seed": 8})
    assert not torch.allclose(a, c)


def test_stacked_generator_is_per_image():
    seeds = image_seeds(3, 0, 4)
    full = StackedRandomGenerator(torch.device("cpu"), seeds).randn(torch.empty(4, 5))
    one = StackedRandomGenerator(torch.device("cpu"), seeds[2:3]).randn(torch.empty(1, 5))
    assert torch.equal(full[2:3], one)
    assert len(set(image_seeds(0, 0, 10)) & set(image_seeds(1, 0, 10))) == 0
