"""Making datasets alike: the per-dataset registry (cameras, actions, proprio) and normalization statistics."""
