"""Writing the BIDS-Derivatives dataset: names, sidecars and shared top-level files."""
