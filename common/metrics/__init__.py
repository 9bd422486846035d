"""Sample-quality metrics: exact ones on analytic data (analytic) and Frechet distances (fd_cnn)."""
