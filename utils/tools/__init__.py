"""Tools around a run, each `python -m utils.tools.NAME`: prepare data, fill masks, plot metrics, downstream checks."""
