"""Where examples come from: RLDS/TFDS episodes, captioned-video shards, synthetic clips."""
