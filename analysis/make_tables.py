"""Rebuild the paper's tables and figures from run records (or from W&B runs).

    python analysis/make_tables.py                         # records under $KV_LATENT_OUTPUT or ./outputs
    python analysis/make_tables.py outputs/runs/tiny_mha   # only these records
    python analysis/make_tables.py --out paper/            # somewhere else than analysis/out/
    python analysis/make_tables.py RUNS --wandb me/kv-latent --dry-run  # dashboards' specs, no network
    python analysis/make_tables.py RUNS --wandb me/kv-latent            # publish them to W&B
    python analysis/make_tables.py --from-wandb --wandb me/kv-latent     # read the runs from W&B instead

Writes ``<out>/tables/<name>.{md,tex,csv}`` + ``<name>.sources.csv`` and
``<out>/figures/<name>.{png,pdf,json}``; every artefact lists the records it used (config hash,
commit). Tables and figures a set of records cannot support (no needle results, no ablation pair)
are skipped with a note. ``--wandb`` publishes, per study (analysis/dashboard.py), the tables and
figures to an analysis run, a Report and a Workspace; with ``--dry-run`` it writes their specs to
``<out>/dashboards/<study>.{report,workspace}.json`` instead and touches no network.
"""

from __future__ import annotations

import argparse
import logging
import json
import os
import socket
import sys
from urllib.parse import urlparse
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import dashboard  # noqa: E402
from analysis.figures import all_figures  # noqa: E402
from analysis.frame import Runs, load_records, load_wandb  # noqa: E402
from analysis.output import Figure, Table, write_figure, write_table  # noqa: E402
from analysis.tables import ABLATIONS, all_tables  # noqa: E402

log = logging.getLogger("make_tables")
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
CONNECT_TIMEOUT_S = 5.0  # how long publishing waits for W&B's server before giving up
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
        help="publish to this W&B project, per study: the tables and figures (an analysis run), a Report "
        "and a Workspace; fails within seconds without network (see --dry-run)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --wandb: write the report and workspace specs to OUT/dashboards/<study>.{report,workspace}.json "
        "and print what would be published, without any network",
    )
    parser.add_argument(
        "--from-wandb",
        action="store_true",
        help="read the runs of the --wandb project instead of records (needs network)",
    )
    args = parser.parse_args(argv)
    if (args.dry_run or args.from_wandb) and not args.wandb:
        parser.error("--dry-run and --from-wandb need --wandb ENTITY/PROJECT")
    if args.wandb and "/" not in args.wandb:
        parser.error(f"--wandb {args.wandb}: give ENTITY/PROJECT (a report and a workspace need the entity)")
    if args.dry_run and args.from_wandb:
        parser.error("--dry-run reads records, not W&B: drop --from-wandb")
    return args


def build(runs: Runs, out: Path) -> tuple[list[Table], list[Figure], list[Path]]:
    """Make and write every artefact the runs allow; return them and the files written."""
    tables, figures = all_tables(runs), all_figures(runs)
    paths = [p for t in tables for p in write_table(t, out / "tables")]
    paths += [p for f in figures for p in write_figure(f, out / "figures")]
    return tables, figures, paths


def log_to_wandb(path: str, tables: list[Table], out: Path, *, study: str | None = None,
                 figures: list[Figure] = ()) -> None:
    """Log the tables (as ``wandb.Table``) and figures (the ``figures``, else the PNGs under
    ``out/figures``) to W&B project ``path``, in an analysis run whose config names the ``study``
    (the run a study's report shows them from)."""
    import wandb

    entity, _, project = path.rpartition("/")
    name = "make_tables" if study is None else f"make_tables/{study}"
    with wandb.init(entity=entity or None, project=project, job_type="analysis", name=name,
                    config={dashboard.STUDY_CONFIG: study}) as run:
        run.log({f"tables/{t.name}": wandb.Table(dataframe=t.frame.astype(object).where(t.frame.notna(), None))
                 for t in tables})
        images = ({f"figures/{f.name}": wandb.Image(f.figure) for f in figures} if figures else
                  {f"figures/{png.stem}": wandb.Image(str(png)) for png in sorted((out / "figures").glob("*.png"))})
        run.log(images)


def dashboards(runs: Runs, args: argparse.Namespace, roots: list[Path]) -> list[tuple]:
    """Per study in ``runs``: its tables, figures and :class:`~analysis.dashboard.Dashboard`."""
    entity, project = args.wandb.split("/", 1)
    command = dashboard.regenerate_command(roots, args.out, args.wandb)
    built = []
    for study, sub in dashboard.split_studies(runs).items():
        tables, figures = all_tables(sub), all_figures(sub)
        report = dashboard.build_report(entity, project, study, sub, tables, figures, command=command)
        built.append((tables, figures, dashboard.Dashboard(study, report,
                                                          dashboard.build_workspace(entity, project, study, sub))))
    return built


def write_specs(built: list[tuple], out: Path) -> list[Path]:
    """Write each study's report and workspace spec as JSON under ``out/dashboards``; print their panels."""
    paths = []
    for _, _, board in built:
        for kind, obj in (("report", board.report), ("workspace", board.workspace)):
            path = out / "dashboards" / f"{board.study}.{kind}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(dashboard.spec(obj), indent=1, sort_keys=True) + "\n")
            paths.append(path)
        print(f"would publish {board.study!r} to {board.report.entity}/{board.report.project}:")
        print("\n".join(f"  {line}" for line in dashboard.panel_list(board)))
    return paths


def check_reachable(target: str) -> None:
    """Exit with the way out if W&B's server does not answer within :data:`CONNECT_TIMEOUT_S` seconds."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        sys.exit(f"--wandb {target}: W&B's server {url.hostname}:{port} is unreachable ({err}). The jobs' offline "
                 "runs upload later with `wandb sync OUTPUT/runs/*/*/wandb/offline-run-*`; to review the dashboards "
                 "without network, add --dry-run (writes OUT/dashboards/<study>.{report,workspace}.json).")


def publish(built: list[tuple], target: str) -> None:
    """Log each study's tables and figures, then save its report and workspace to W&B."""
    for tables, figures, board in built:
        log_to_wandb(target, tables, Path(), study=board.study, figures=figures)
        board.report.save()
        board.workspace.save()
        log.info("published %s: report %s, workspace %s", board.study, board.report.url, board.workspace.url)


def main(argv: list[str] | None = None) -> list[Path]:
    """The command line; returns the files written."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    roots = args.records or [default_records_root()]
    if args.wandb and not args.dry_run:
        check_reachable(args.wandb)
    if args.from_wandb:
        runs = load_wandb(args.wandb)
    else:
        runs = load_records(roots)
        if runs.frame.empty:
            log.warning("no complete records under %s: only the RoPE table and figure are made", [str(r) for r in roots])
    log.info("%d runs loaded", len(runs.frame))
    tables, figures, paths = build(runs, args.out)
    if args.wandb:
        built = dashboards(runs, args, roots)
        if args.dry_run:
            paths += write_specs(built, args.out)
        else:
            publish(built, args.wandb)
    made = {t.name for t in tables} | {f.name for f in figures}
    log.info("wrote %d files to %s: %s", len(paths), args.out, ", ".join(sorted(made)))
    if ARTEFACTS - made:
        log.info("not made (no record has what they need): %s", ", ".join(sorted(ARTEFACTS - made)))
    return paths


if __name__ == "__main__":
    main()
