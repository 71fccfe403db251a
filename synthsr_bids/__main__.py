"""``python -m synthsr_bids``: the BIDS-App command line."""

import sys

from synthsr_bids.cli.run import main

sys.exit(main())
