"""Training. For now one plain single-process loop (`simple.py`); the distributed trainer replaces it."""
