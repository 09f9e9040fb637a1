#!/usr/bin/env python3
"""Build the embedded sample dataset (scikit-learn's digits as JPEGs) into data/sample/.

python data/build_sample.py            # skips the work when the set is already complete
python data/build_sample.py --root /tmp/digits
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lars.data.sample import build_sample_dataset, default_sample_dir, is_complete  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"where to build it (default: {default_sample_dir()})",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing when already built")
    args = parser.parse_args()
    root = args.root or default_sample_dir()
    if is_complete(root):
        if not args.quiet:
            print(f"sample dataset already complete in {root}")
        return
    build_sample_dataset(root)


if __name__ == "__main__":
    main()
