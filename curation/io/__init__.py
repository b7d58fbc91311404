"""Storage: the filesystem helper, inputs in, outputs out."""
