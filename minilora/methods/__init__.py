"""One file per parameter-efficient method, each readable alone; the public API re-exports them (minilora/__init__.py)."""
