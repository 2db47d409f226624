"""The command line: `python -m miniworld pretrain|pool|show` (see the package docstring)."""
import argparse

from . import __doc__ as PACKAGE_DOC
from .model import CHECKPOINT, PRETRAIN_BATCH, PRETRAIN_IMAGES, PRETRAIN_LR, PRETRAIN_STEPS, pretrain
from .task import show, write_pool


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m miniworld", description=PACKAGE_DOC.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pretrain", help="pretrain the tiny CLIP and write assets/miniclip.pt")
    pp.add_argument("--steps", type=int, default=PRETRAIN_STEPS)
    pp.add_argument("--batch-size", type=int, default=PRETRAIN_BATCH)
    pp.add_argument("--lr", type=float, default=PRETRAIN_LR)
    pp.add_argument("--images", type=int, default=PRETRAIN_IMAGES)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--out", default=str(CHECKPOINT))
    sub.add_parser("pool", help="write the ARF retrieval pool").add_argument("--out", required=True)
    ps = sub.add_parser("show", help="a grid of examples per style with captions")
    ps.add_argument("--out", default="grid.png")
    args = p.parse_args(argv)
    if args.cmd == "pretrain":
        pretrain(args.steps, args.batch_size, args.lr, args.images, out=args.out, seed=args.seed)
    elif args.cmd == "pool":
        print(write_pool(args.out))
    else:
        print(show(args.out))


if __name__ == "__main__":
    main()
