"""The one layer-by-layer calibration loop and what it needs."""
