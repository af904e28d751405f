"""Command line: ``distillcse verify`` (or ``python -m distillcse verify``)."""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="distillcse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="compare every available backend with the reference and print a table")
    v.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    v.add_argument("--sizes", type=int, nargs="+", default=[37, 130], help="batch sizes (default: 37 130)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        from .verify import verify
        verify(device=args.device, sizes=args.sizes)


if __name__ == "__main__":
    main()
