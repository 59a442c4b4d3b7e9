"""Text sources for calibration and evaluation, from the Hub or a local mirror in the Hub's layout."""
