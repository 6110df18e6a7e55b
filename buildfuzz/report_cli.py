"""The ``buildfuzz report`` command, registered on the app in ``buildfuzz.cli``."""

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from buildfuzz.errors import BuildfuzzError, UsageError


def _fail(error: BuildfuzzError) -> NoReturn:
    # The same one-line message and exit code as buildfuzz.cli._fail, which
    # this module cannot import because buildfuzz.cli imports this module.
    typer.echo(f"buildfuzz: error: {error}", err=True)
    raise typer.Exit(error.exit_code)


def report(
    results: Annotated[
        Path, typer.Option(help="Results directory to report on.")
    ] = Path("results"),
    junit: Annotated[
        Path | None,
        typer.Option(help="JUnit XML file to write, a failing test case per finding."),
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option(help="Markdown summary file to write, e.g. $GITHUB_STEP_SUMMARY."),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(help="Self-contained HTML page with charts to write."),
    ] = None,
) -> None:
    """Write JUnit XML, Markdown and HTML reports of a results directory."""
    from buildfuzz.report import write_reports

    try:
        if junit is None and markdown is None and html is None:
            raise UsageError("give at least one of --junit, --markdown and --html")
        written = write_reports(results, junit=junit, markdown=markdown, html=html)
    except BuildfuzzError as error:
        _fail(error)
    for path in written:
        typer.echo(f"wrote {path}")
