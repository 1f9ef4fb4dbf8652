"""caft.interp."""
