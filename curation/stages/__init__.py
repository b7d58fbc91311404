"""Pipeline stages: batch callables with ``setup()`` and ``__call__(batch)``; no Ray imports."""
