"""Offline jobs that run the models over data once: VAE latents, instruction embeddings, simulator episode
collection and captioned-video ingest."""
