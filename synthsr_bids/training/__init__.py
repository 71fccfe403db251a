"""Training of synthsr-bids' own SynthSR model (PyTorch).

* :mod:`.generator` (+ :mod:`.spatial`, :mod:`.intensity`, :mod:`.resolution`, :mod:`.lesions`,
  :mod:`.labels`): the generative model, label maps -> (input, target, labels, lesion mask);
* :mod:`.config`, :mod:`.losses`, :mod:`.loop`: the resumable segmentation -> regression job;
* ``python -m synthsr_bids.training train --config configs/default.toml``: the entry point.
"""
