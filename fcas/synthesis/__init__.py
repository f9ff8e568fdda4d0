"""Synthesis: per-sample plans, output naming/writing and the synthesis manifest contract."""
