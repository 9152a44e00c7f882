"""Simulators the policies act in (Meta-World)."""
