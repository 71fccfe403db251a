#!/usr/bin/env python3
"""Pre-fetch the TemplateFlow files the group level uses into ``$TEMPLATEFLOW_HOME``
(run at image build time, so containers never download at run time):
MNI152NLin2009cAsym at 1 mm, the T1w template and its brain mask.

    TEMPLATEFLOW_HOME=/opt/templateflow python fetch_templates.py
    python fetch_templates.py --optional   # a build without access to TemplateFlow's
                                           # servers: keep the skeleton, warn, exit 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: (template, query) pairs; every query must give exactly one non-empty file.
TEMPLATES: tuple[tuple[str, dict[str, object]], ...] = (
    ("MNI152NLin2009cAsym", {"resolution": 1, "desc": None, "suffix": "T1w", "extension": ".nii.gz"}),
    ("MNI152NLin2009cAsym", {"resolution": 1, "desc": "brain", "suffix": "mask", "extension": ".nii.gz"}),
)


def fetch() -> list[Path]:
    from templateflow import api  # importing it creates the skeleton under TEMPLATEFLOW_HOME

    paths = []
    for template, query in TEMPLATES:
        found = api.get(template, raise_empty=True, **query)
        found = found if isinstance(found, list) else [found]
        if len(found) != 1:
            raise RuntimeError(f"{template} {query}: expected one file, got {found}")
        path = Path(found[0])
        if not path.is_file() or path.stat().st_size == 0:
            raise RuntimeError(f"{template} {query}: {path} was not downloaded")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optional", action="store_true",
                        help="warn instead of failing when the files cannot be downloaded")
    opts = parser.parse_args(argv)
    if not os.environ.get("TEMPLATEFLOW_HOME"):
        parser.error("set TEMPLATEFLOW_HOME to the folder to fill")
    try:
        paths = fetch()
    except Exception as exc:  # noqa: BLE001 - any download problem
        if opts.optional:
            print(f"WARNING: TemplateFlow templates not fetched ({exc}); the image has only the "
                  "TemplateFlow skeleton. Bind a TemplateFlow folder at run time.", file=sys.stderr)
            return 0
        print(f"ERROR: cannot fetch the TemplateFlow templates: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
