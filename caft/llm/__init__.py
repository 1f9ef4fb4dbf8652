"""caft.llm: LLM providers behind one async contract."""
