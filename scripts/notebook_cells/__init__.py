"""The cells of each notebook in notebooks/, by topic (written by scripts/make_notebooks.py)."""
