"""DVC stages: one module per stage, `python -m pipeline.<stage> [--params PATH] [--debug]`."""
