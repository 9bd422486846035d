"""The harness: config, data, the training loop, sampling, metrics, reports, MLflow tracking and the CLI.

It runs the methods (`methods/`) on the math core (`core/`); nothing below imports from here."""
