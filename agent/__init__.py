"""caft.agent."""
