"""curation: curate image datasets by their embeddings on Ray."""

__version__ = "0.1.0"
