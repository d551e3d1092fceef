"""The ``ntkit`` command line."""

from __future__ import annotations

import sys

import click


@click.group()
@click.version_option(package_name="ntkit")
def main() -> None:
    """ntkit: Neural Tangent Kernels in PyTorch."""


@main.group()
def reproduce() -> None:
    """Reproduce a paper's experiments end to end."""


@reproduce.command("jgh20")
@click.option("--experiment", type=click.Choice(["convergence", "regression", "pca", "all"]),
              default="all", show_default=True, help="Which figure to reproduce.")
@click.option("--scale", type=click.Choice(["quick", "default", "paper"]), default="default",
              show_default=True,
              help="quick: < 2 min (tests); default: < 15 min on 2 CPU cores; paper: the "
                   "paper's widths (10000), GPU advised.")
@click.option("--out", "out", default="jgh20-results", show_default=True,
              type=click.Path(file_okay=False), help="Directory for figures, JSON and report.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every initialisation and random draw.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where networks are trained (analytic kernels are computed on the CPU).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show tqdm progress bars on stderr.")
@click.option("--resume", is_flag=True,
              help="Reuse the experiments an earlier, interrupted run finished (saved in "
                   "OUT/checkpoints/ with the same scale, seed and device).")
@click.option("--force", is_flag=True,
              help="Write into a non-empty folder ntkit did not create, or replace an earlier "
                   "run in OUT made with other settings. Files ntkit did not write are never "
                   "overwritten or deleted, even with --force.")
def jgh20(experiment: str, scale: str, out: str, seed: int, device: str, progress: bool,
          resume: bool, force: bool) -> None:
    """Jacot, Gabriel & Hongler (2018), §6: Figs. 1–3 with a report beside the paper's numbers.

    OUT must be new, empty, or the folder of an earlier ntkit run (marked by its
    .ntkit-run.json). Running one --experiment into a folder that holds others of the same
    settings keeps them: results.json and report.md cover all.
    """
    from .experiments import jgh20 as exp

    experiments = exp.EXPERIMENTS if experiment == "all" else (experiment,)
    try:
        if scale == "paper" and device == "cpu":
            click.echo("Note: --scale paper trains width-10000 networks; a GPU "
                       "(--device cuda) is advised, on CPU this takes hours.", err=True)
        exp.run(experiments, scale=scale, out=out, seed=seed, device=device, progress=progress,
                resume=resume, force=force, notify=lambda message: click.echo(message, err=True))
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted. Finished experiments are saved in {out}/"
                   f"{exp.CHECKPOINT_DIR}/; rerun the same command with --resume to continue "
                   "from them.", err=True)
        sys.exit(130)
    click.echo(f"Wrote figures, results.json and report.md to {out}/")


@main.command("report")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="Write into OUT even if ntkit did not create it (files ntkit did not "
                   "write are still never overwritten).")
def report_command(out: str, force: bool) -> None:
    """Rebuild report.md and the figures of a saved run in OUT, without recomputing."""
    from .experiments.report import rebuild

    try:
        written = rebuild(out, force=force)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"Wrote {', '.join(written)} to {out}/")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
