"""caft.prompts."""
