"""Command line: ``distillcse train``, ``distillcse sts``, ``distillcse verify`` and
``distillcse bench {memory,targets,train,plot}`` (or ``python -m distillcse ...``)."""
import argparse

from . import checks


def _help_text(doc):
    """A module docstring as a command's description: reST's ``code`` marks as `code`."""
    return doc.replace("``", "`")


def _add_bench(sub):
    from . import bench, bench_targets, bench_train
    b = sub.add_parser("bench", help="benchmarks: loss memory/time sweep, training steps, plots")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    m = bsub.add_parser("memory", help="sweep the batch size for every loss implementation: peak extra "
                        "memory, forward+backward time, ratio to the bare GEMMs; CSV, table, plots",
                        description=_help_text(bench.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_memory_arguments(m)
    t = bsub.add_parser("train", help="training-step time and peak memory of a real encoder with each loss backend",
                        description=_help_text(bench_train.__doc__),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_train.add_train_arguments(t)
    tg = bsub.add_parser("targets", help="the headline figures at their stated sizes (B = 64, 65,536, 2^20) "
                         "against their targets; CSV and table", description=_help_text(bench_targets.__doc__),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_targets.add_targets_arguments(tg)
    pl = bsub.add_parser("plot", help="plot a results.csv of `bench memory` (memory and time vs B)")
    pl.add_argument("csv", help="results.csv written by `distillcse bench memory`")
    pl.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's folder)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="distillcse", description=_help_text(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="compare every available backend with the reference and print a table")
    v.add_argument("--device", type=checks.cli_device, default=None, help="cpu or cuda (default: cuda when available)")
    v.add_argument("--sizes", type=checks.batch_size, nargs="+", default=[37, 130], help="batch sizes (default: 37 130)")
    from . import train
    tr = sub.add_parser("train", help="train a sentence encoder with the DistillCSE loss; STS-B dev "
                        "model selection, STS test suite at the end; resumable",
                        description=_help_text(train.__doc__),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_train_arguments(tr)
    st = sub.add_parser("sts", help="STS12-16, STS-B and SICK-R Spearman x 100 of an encoder (SentEval, "
                        "as SimCSE and DistillCSE report them)")
    train.add_sts_arguments(st)
    _add_bench(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        train.run_train(args)
    elif args.command == "sts":
        train.run_evaluate(args)
    elif args.command == "verify":
        from .verify import verify
        if not all(row["ok"] for row in verify(device=args.device, sizes=args.sizes)):
            raise SystemExit(1)
    elif args.command == "bench":
        if args.bench_command == "memory":
            from .bench import run_memory
            run_memory(args)
        elif args.bench_command == "targets":
            from .bench_targets import run_targets
            run_targets(args)
        elif args.bench_command == "train":
            from .bench_train import run_train
            run_train(args)
        else:
            from .plot import run_plot
            run_plot(args.csv, args.out, lambda message: parser.error(f"bench plot: {message}"))


if __name__ == "__main__":
    main()
