"""Interactive serving: the multi-turn command-line chat (``cli``)."""
