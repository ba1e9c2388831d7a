"""Re-save a trusted legacy checkpoint (e.g. written by plain mmengine) so that it loads with torch's
weights-only loader, i.e. without --trust-checkpoint from then on.

    python tools/model_converters/resave_checkpoint.py TRUSTED_IN.pth OUT.pth

IN is loaded with full unpickling, which can run code stored in the file: use it only for files whose origin
you trust. OUT loads safely if IN held nothing but tensors, plain containers and mmengine's log buffers;
otherwise the tool names what is left and exits with code 1.
"""

import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "projects"))

import tokenprune  # noqa: F401,E402  (installs the allow-list and the safe loader)
from tokenprune.mmdet_plugin.safe_load import resave_trusted  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="Re-save a trusted checkpoint so that it loads weights-only")
    parser.add_argument("src", help="the trusted checkpoint (loaded with full unpickling)")
    parser.add_argument("dst", help="where to write the safe copy")
    args = parser.parse_args()
    left = resave_trusted(args.src, args.dst)
    if left:
        print(f"saved {args.dst}, but it still holds objects the weights-only loader refuses: {', '.join(left)}")
        return 1
    print(f"saved {args.dst}: it loads with torch's weights-only loader")
    return 0


if __name__ == "__main__":
    sys.exit(main())
