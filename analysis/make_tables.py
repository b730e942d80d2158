"""Rebuild the paper's tables and figures from run records (or from W&B runs).

    python analysis/make_tables.py                         # records under $KV_LATENT_OUTPUT or ./outputs
    python analysis/make_tables.py outputs/runs/tiny_mha   # only these records
    python analysis/make_tables.py --out paper/            # somewhere else than analysis/out/
    python analysis/make_tables.py --wandb me/kv-latent    # read W&B runs instead; log the results there

Writes ``<out>/tables/<name>.{md,tex,csv}`` + ``<name>.sources.csv`` and
``<out>/figures/<name>.{png,pdf,json}``; every artefact lists the records it used (config hash,
commit). Tables and figures a set of records cannot support (no needle results, no ablation pair)
are skipped with a note.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.figures import all_figures  # noqa: E402
from analysis.frame import Runs, load_records, load_wandb  # noqa: E402
from analysis.output import Figure, Table, write_figure, write_table  # noqa: E402
from analysis.tables import ABLATIONS, all_tables  # noqa: E402

log = logging.getLogger("make_tables")
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
ARTEFACTS = {"main", "k_versus_v", "k_versus_v_summary", "efficiency", "rope_stability", "init_ablation",
             "gqa_conversion", "kv_bytes_quality", *ABLATIONS.values(), "kv_heatmap", "pareto", "training_curves", "needle"}


def default_records_root() -> Path:
    """Where jobs write their records: ``$KV_LATENT_OUTPUT/runs`` (as in conf/config.yaml), else ./outputs/runs."""
    return Path(os.environ.get("KV_LATENT_OUTPUT", "outputs")) / "runs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rebuild kv-latent's tables (Markdown, LaTeX, CSV) and figures (PNG, PDF) from run "
        "records. Each artefact lists the records it used.",
        epilog="Writes OUT/tables/<name>.{md,tex,csv,sources.csv} and OUT/figures/<name>.{png,pdf,json} for "
        f"{', '.join(sorted(ARTEFACTS))}; artefacts the records cannot support are skipped with a note.",
    )
    parser.add_argument(
        "records",
        nargs="*",
        type=Path,
        help=f"directories searched recursively for record.json (default: {default_records_root()})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--wandb",
        metavar="ENTITY/PROJECT",
        help="read the runs of this W&B project instead of records, and log the tables and figures to it",
    )
    return parser.parse_args(argv)


def build(runs: Runs, out: Path) -> tuple[list[Table], list[Figure], list[Path]]:
    """Make and write every artefact the runs allow; return them and the files written."""
    tables, figures = all_tables(runs), all_figures(runs)
    paths = [p for t in tables for p in write_table(t, out / "tables")]
    paths += [p for f in figures for p in write_figure(f, out / "figures")]
    return tables, figures, paths


def log_to_wandb(path: str, tables: list[Table], out: Path) -> None:
    """Log the tables (as ``wandb.Table``) and figure PNGs (as images) to W&B project ``path``."""
    import wandb

    entity, _, project = path.rpartition("/")
    with wandb.init(entity=entity or None, project=project, job_type="analysis", name="make_tables") as run:
        run.log({f"tables/{t.name}": wandb.Table(dataframe=t.frame.astype(object).where(t.frame.notna(), None))
                 for t in tables})
        run.log({f"figures/{png.stem}": wandb.Image(str(png)) for png in sorted((out / "figures").glob("*.png"))})


def main(argv: list[str] | None = None) -> list[Path]:
    """The command line; returns the files written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.wandb:
        runs = load_wandb(args.wandb)
    else:
        roots = args.records or [default_records_root()]
        runs = load_records(roots)
        if runs.frame.empty:
            log.warning("no complete records under %s: only the RoPE table and figure are made", [str(r) for r in roots])
    log.info("%d runs loaded", len(runs.frame))
    tables, figures, paths = build(runs, args.out)
    if args.wandb:
        log_to_wandb(args.wandb, tables, args.out)
    made = {t.name for t in tables} | {f.name for f in figures}
    log.info("wrote %d files to %s: %s", len(paths), args.out, ", ".join(sorted(made)))
    if ARTEFACTS - made:
        log.info("not made (no record has what they need): %s", ", ".join(sorted(ARTEFACTS - made)))
    return paths


if __name__ == "__main__":
    main()
