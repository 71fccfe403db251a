"""synthsr-bids: SynthSR as a BIDS App.

Turns clinical brain MRI of any contrast, orientation and slice thickness into a
synthetic 1 mm isotropic T1-weighted MPRAGE (Iglesias et al., NeuroImage 2021;
Science Advances 2023), written as a BIDS-Derivatives dataset.
"""

__version__ = "0.1.0"
CODE_URL = "https://github.com/synthsr-bids/synthsr-bids"

__all__ = ["__version__", "CODE_URL"]
