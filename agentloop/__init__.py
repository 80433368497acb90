"""agentloop: exploration-based training of LLM agents (ETO and STE) on real environments."""

__version__ = "0.1.0"
