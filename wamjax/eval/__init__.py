"""Evaluation of trained world-action models: closed-loop rollouts in a simulator (Meta-World)."""
