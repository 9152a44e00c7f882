"""Episodes into training clips: windows, camera views, held-out episodes, mixtures, per-process splits."""
