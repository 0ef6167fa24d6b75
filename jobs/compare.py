"""Compare MLflow runs as a table like the paper's Tables 1 and 7: one row per trial, the swept params, the metrics.

    python jobs/compare.py --sweep cfg-tiny --tracking-uri sqlite:///runs/sweeps/cfg-tiny/mlflow.db --out runs/cmp
    python jobs/compare.py --sweep runs/sweeps/cfg-tiny --out runs/cmp          # the store inside the sweep folder
    python jobs/compare.py --parent-run-id 3f2a... --metrics rfid,ris --out runs/cmp-fusion
    python jobs/compare.py --experiment ideal-eval --sort-by rfid --out runs/cmp-eval

Columns: the params that differ between the runs, then --metrics (default: every numeric metric the runs share,
gFID / rFID first). Prints the Markdown table and writes <out>/comparison.md, comparison.csv and comparison.png:
FID vs CFG scale for a CFG sweep, rFID vs probe top-1 by layer (the paper's Figure 1) for a layer study, bars of
the first metric otherwise. The MLflow store: --tracking-uri, else $MLFLOW_TRACKING_URI, else <sweep>/mlflow.db.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import outcome, require_durable_paths, require_usable_folders  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", help="a sweep's name or folder (its parent run's children are the rows)")
    which.add_argument("--parent-run-id", help="a parent run id (its children are the rows)")
    which.add_argument("--experiment", help="an MLflow experiment (every run but sweep parents)")
    p.add_argument("--out", required=True, help="folder for comparison.md / .csv / .png (replaced if present)")
    p.add_argument("--metrics", default=None, help="comma-separated metric columns (default: the shared ones)")
    p.add_argument("--sort-by", default=None, help="a metric, best first (default: by the param values)")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    require_durable_paths(**{"--out": args.out})  # under `ray job submit --working-dir`: absolute only
    require_usable_folders(**{"--out": args.out})

    from ideal_ray.tune.compare import compare_runs, tracking_uri_for

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    with outcome("run the same command again (it rewrites --out)"):
        uri = tracking_uri_for(args.tracking_uri, args.sweep)
        out = compare_runs(uri, args.out, sweep=args.sweep, parent_run_id=args.parent_run_id,
                           experiment=args.experiment, metrics=metrics, sort_by=args.sort_by)
    print(f"{out['title']}: {out['rows']} run(s)\n")
    print(out["markdown"])
    print("wrote " + ", ".join(out["files"].values()) + (f" (plot: {out['plot_kind']})" if out["plot_kind"] else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
