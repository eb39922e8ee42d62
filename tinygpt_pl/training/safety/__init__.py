"""What keeps a run from being lost: stop signals (signals.py, interrupt.py), divergence (nonfinite.py), one run per
folder (runlock.py) and the Lightning releases its internals are tested with (versions.py)."""
