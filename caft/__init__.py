"""caft: Concept Ablation Fine-Tuning with an LLM judge agent in the loop.

Importing `caft` is cheap: heavy packages (torch, transformers, nnsight, sae_lens, peft) are imported
only by the modules that need them, so API-only commands start fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
