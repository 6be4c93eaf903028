"""Stage 2: methods that read stores only (linear probe, k-NN, k-means, retrieval) and
their metrics."""
