"""What is done with the synthetic T1w images: segmentation, volumes, lesion masks.

* :mod:`.images` finds the synthetic images participant level wrote and names every file
  derived from one of them;
* :mod:`.labels` FreeSurfer label names/colours, BIDS ``dseg.tsv`` look-up tables and
  left/right pairing;
* :mod:`.volumes` per-structure volumes and hemispheric asymmetry;
* :mod:`.lesions` finds lesion masks and resamples them onto the synthetic grid;
* :mod:`.segment` runs the segmentation U-Net (the only module here that imports torch);
* :mod:`.participant` the participant-level steps after synthesis.
"""
