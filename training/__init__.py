"""caft.training."""
