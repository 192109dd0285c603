"""Loss curves of finished pre-training runs in one plot, and a markdown table with tokens/s.

    python launchers/compare_runs.py runs/pretrain-gpt2-small-fsdp2 runs/gpt2-small-adamw \
        --names SOAP AdamW --out docs/bench_results/pretrain_gpt2_small.png

    python launchers/compare_runs.py runs/a runs/b --x time --out loss_vs_time.png   # against wall-clock

Ratios in the table are against the first run. See docs/benchmarks.md ("Pre-training").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from soap_apps.pretrain.compare import compare  # noqa: E402


def _plot_formats() -> set[str]:
    """The file suffixes matplotlib's Agg backend (the one the plot uses) can write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return set(FigureCanvasAgg.get_supported_filetypes())


def main(argv: list[str] | None = None) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="launchers/compare_runs.py", description=__doc__, formatter_class=raw
    )
    parser.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--names", nargs="+", help="one label per run (default: the directory names)")
    parser.add_argument("--out", default="loss_comparison.png", help="where to write the plot")
    parser.add_argument("--title", default="", help="plot title")
    parser.add_argument(
        "--x",
        choices=("tokens", "step", "time"),
        default="tokens",
        help="the plot's x axis: tokens seen, optimizer steps, or wall-clock seconds in the loop (elapsed_s)",
    )
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        parser.error(f"--names has {len(args.names)} entries for {len(args.runs)} run directories")
    formats = _plot_formats()
    if Path(args.out).suffix.lower().lstrip(".") not in formats:  # before any run is read
        parser.error(
            f"--out {args.out}: the plot is written by matplotlib, which cannot write "
            f"{Path(args.out).suffix or 'a name without a suffix'}; end the name in .png, .pdf or .svg "
            f"(or one of {', '.join(sorted(formats))})"
        )
    try:
        result = compare(args.runs, args.out, args.names, args.title, args.x)
    except (FileNotFoundError, ValueError) as error:  # no training records, a damaged file, no --out folder
        parser.error(str(error))
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(result["table"])
    print(f"\nplot: {result['plot']}")


if __name__ == "__main__":
    main()
