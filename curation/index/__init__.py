"""Nearest-neighbour search over embeddings (FAISS)."""
