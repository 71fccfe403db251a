"""Running the network on one scan: preprocessing, flip averaging, post-processing, devices.

The entry point is :func:`synthsr_bids.inference.predict.synthesize`. Submodules are not
imported here, so that ``import synthsr_bids.inference.device`` stays cheap.
"""
