#!/usr/bin/env python3
"""BIDS-App entry point (``run.py bids_dir output_dir participant|group [options]``).

A thin wrapper around the installed package, as the BIDS-Apps template expects.
"""

import sys

from synthsr_bids.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
