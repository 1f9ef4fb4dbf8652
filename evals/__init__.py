"""caft.evals."""
