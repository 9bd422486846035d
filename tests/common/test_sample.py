"""Per-image seeds: samples do not depend on the batch size; different seeds give different samples; shards make
sampling resumable without changing a bit."""

import numpy as np
import torch

from common.sample import StackedRandomGenerator, generate, generate_sharded, image_seeds
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


# ---------------------------------------------------------------------------------------------------
# Shards: resumable sampling, bitwise the samples of one pass


def _sharded(parts, key=None, n=23, **kw):
    model = EDMDenoiser(TinyNet())
    args = dict(item_shape=(2,), n=n, steps=3, seed=7, batch_size=5, device=torch.device("cpu"), label_dim=0)
    args.update(kw)
    return generate_sharded(EDMTeacher(), model, parts=parts, key=key or {"run": "r"}, shard_images=7, **args)


def test_shards_give_bitwise_the_samples_of_one_pass(tmp_path):
    x, z, _ = generate(EDMTeacher(), EDMDenoiser(TinyNet()), (2,), 23, 3, 7, 5, torch.device("cpu"))
    xs, zs, labels, seconds = _sharded(tmp_path / "parts")
    assert np.array_equal(xs, x.numpy()) and np.array_equal(zs, z.numpy()) and labels is None
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["shard-00000.npz", "shard-00001.npz",
                                                                       "shard-00002.npz"]  # 10 + 10 + 3 images
    assert seconds > 0


def test_a_rerun_keeps_good_shards_and_redoes_missing_damaged_and_other_ones(tmp_path, monkeypatch):
    import common.sample as sample

    parts = tmp_path / "parts"
    first = _sharded(parts)
    (parts / "shard-00001.npz").unlink()  # killed before this shard was written
    (parts / "shard-00002.npz").write_bytes(b"torn")  # (atomic writes prevent this; a damaged disk does not)
    drawn = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: drawn.append((k["start"], a[3])) or real(*a, **k))
    again = _sharded(parts)
    assert drawn == [(10, 20), (20, 23)]  # shard 0 was read back, not drawn
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], again[:2], strict=True))
    drawn.clear()
    _sharded(parts, key={"run": "another"})  # another run config, weights, steps or seed: nothing is reused
    assert drawn == [(0, 10), (10, 20), (20, 23)]
    drawn.clear()
    _sharded(parts, key={"run": "another"}, n=25)  # more samples: the full shards stay, the last one grows
    assert drawn == [(20, 25)]


def test_progress_lines_in_a_log_file_give_rate_and_eta():
    import io

    from common.progress import Progress

    now = [0.0]
    log = io.StringIO()  # not a terminal: periodic lines instead of a bar
    with Progress(100, "sampling", every=30, stream=log, clock=lambda: now[0]) as p:
        p.skip(20)  # found done by an earlier attempt: not counted in the rate
        now[0] = 10.0
        p.update(10)  # before 30 s: silent
        now[0] = 40.0
        p.update(20)
    lines = log.getvalue().splitlines()
    assert lines[0] == "sampling: 50/100 img, 20 found done, 0.75 img/s, ETA 1m07s"
    assert lines[1] == "sampling: 50/100 img, 20 found done in 40s, 0.75 img/s, ETA 1m07s"
