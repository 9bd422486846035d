"""The shared gmm teacher fixture is itself a decent teacher (so method tests built on it mean something)."""

from tests.methods.conftest import sample_error, train_method  # noqa: F401


def test_fixture_teacher_is_close_to_the_exact_flow_map(gmm, gmm_teacher_dir):
    import torch

    from common.models import load_trained

    _, method, model, _ = load_trained(gmm_teacher_dir, torch.device("cpu"))
    err = sample_error(method, model, gmm, steps=18)
    assert err["flow_map_error"] < 0.1, err
