"""Shared parts of cmbench: config, data, backbone, conventions, training loop, sampling, metrics."""
