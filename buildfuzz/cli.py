"""The ``buildfuzz`` command line.

Exit codes: 0 no findings (or, for replay, reproduced), 1 findings (or not
reproduced), 2 usage or environment error, 130 interrupted.
"""

import os
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer

from buildfuzz import __version__, logs, secrets
from buildfuzz.budget import format_duration, parse_duration, parse_size
from buildfuzz.errors import EXIT_INTERRUPTED, BuildfuzzError, SetupError, UsageError
from buildfuzz.report_cli import report as report_command
from buildfuzz.shard import Shard
from buildfuzz.strategies_cli import strategies as strategies_command
from buildfuzz.workdir import DEFAULT_BASE

app = typer.Typer(
    name="buildfuzz",
    help="A configuration fuzzer for Docker BuildKit and buildx.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    # Plain click messages: a usage error is a short "Error: ..." text.
    rich_markup_mode=None,
)

LogFormat = Annotated[
    str, typer.Option("--log-format", help="Log lines as 'console' or 'json'.")
]
SecretEnv = Annotated[
    list[str] | None,
    typer.Option(
        "--secret-env",
        help="Name of an environment variable whose value is secret: it is "
        "redacted from logs and results. Repeat for several.",
    ),
]
Workdir = Annotated[
    Path,
    typer.Option("--workdir", help="Directory for sandbox engines and build contexts."),
]


def _fail(error: BuildfuzzError) -> NoReturn:
    typer.echo(f"buildfuzz: error: {error}", err=True)
    raise typer.Exit(error.exit_code)


def _os_error(error: OSError) -> SetupError:
    """Turn an unexpected file-system error into one line that names the path."""
    where = f"{error.filename}: " if error.filename else ""
    return SetupError(f"{where}{error.strerror or error}")


def _add_builder_files(paths: list[Path]) -> None:
    """Make load_definitions read ``paths`` too, here and in worker processes."""
    from buildfuzz.definitions import EXTRA_BUILDERS_VARIABLE

    for path in paths:
        if not path.is_file():
            raise UsageError(f"--builders-file {path}: file not found")
    if paths:
        known = [os.environ.get(EXTRA_BUILDERS_VARIABLE, "")]
        joined = ":".join([*filter(None, known), *(str(p.absolute()) for p in paths)])
        os.environ[EXTRA_BUILDERS_VARIABLE] = joined


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Stop the run on the first SIGINT, SIGTERM or SIGHUP; ignore later ones.

    A second Ctrl-C would otherwise cut short the clean-up and the writing
    of the finding in progress. SIGKILL still stops buildfuzz at once, and
    the next run removes what it left behind.
    """
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    raise KeyboardInterrupt


def _configure(log_format: str) -> None:
    if log_format not in ("console", "json"):
        _fail(UsageError(f"invalid --log-format {log_format!r}; use console or json"))
    logs.configure(log_format)
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)


def _engine_host(host: str | None, context: str | None) -> str | None:
    """Return the daemon that --engine-host or --engine-context names."""
    if context is None:
        return host
    if host is not None:
        raise UsageError(
            "--engine-host and --engine-context both name a daemon; give one"
        )
    from buildfuzz.docker_context import ContextError, context_host

    try:
        return context_host(context)
    except ContextError as error:
        raise UsageError(f"--engine-context: {error}") from None


def _differential_pairs(values: list[str]) -> tuple[str, ...]:
    """Check --differential pairs before the run writes anything."""
    from buildfuzz.definitions import load_definitions
    from buildfuzz.oracle_diff import parse_pairs

    if values:
        parse_pairs(values, load_definitions())
    return tuple(values)


@app.command()
def run(
    budget: Annotated[
        str, typer.Option(help="Time to fuzz, such as 90s, 10m, 1h or 1h30m.")
    ] = "10m",
    seed: Annotated[
        int | None, typer.Option(help="Seed of the case sequence (random if not set).")
    ] = None,
    results: Annotated[
        Path, typer.Option(help="Directory that findings are written to.")
    ] = Path("results"),
    profile: Annotated[
        str, typer.Option(help="Profile name in strategies/, or a path to a .toml.")
    ] = "default",
    build_timeout: Annotated[
        str, typer.Option(help="Time one build may take before it counts as a hang.")
    ] = "1m",
    shrink_budget: Annotated[
        str | None,
        typer.Option(
            help="Time to shrink each new finding (default: budget/4, >= 1m)."
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Report every failure, even expected ones.")
    ] = False,
    offline: Annotated[
        bool, typer.Option(help="Do not download missing engine packages.")
    ] = False,
    shard: Annotated[
        str,
        typer.Option(
            help="Run shard K of N (K/N): with the same --seed, N shards run "
            "disjoint cases that together make up the unsharded run."
        ),
    ] = "1/1",
    jobs: Annotated[
        int,
        typer.Option(
            help="Cases run in parallel, each worker on sandbox engines of its own."
        ),
    ] = 1,
    min_free: Annotated[
        str,
        typer.Option(
            help="Start no new case when less disk than this is free under "
            "--workdir, such as 2G or 500M."
        ),
    ] = "2G",
    resume: Annotated[
        bool,
        typer.Option(
            "--continue",
            help="Go on with the seed of the last run of this profile in --results, "
            "from the case where it stopped (a new seed when there was none).",
        ),
    ] = False,
    ci: Annotated[
        bool,
        typer.Option(
            "--ci",
            help="Replay every known finding first, then fuzz. Exit 0: no "
            "findings; 1: new findings or changed signatures; 3: known only.",
        ),
    ] = False,
    junit: Annotated[
        Path | None, typer.Option(help="Write a JUnit XML report here at the end.")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write a Markdown summary here at the end.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option(help="Write the HTML report here at the end.")
    ] = None,
    engine_host: Annotated[
        str | None,
        typer.Option(
            help="Run every case on this existing Docker daemon (for example "
            "unix:///var/run/docker.sock) instead of sandbox engines; buildfuzz "
            "removes only what it created there.",
        ),
    ] = None,
    disposable_engine: Annotated[
        bool,
        typer.Option(
            "--disposable-engine",
            help="The --engine-host or --engine-context daemon is a throw-away "
            "one (such as a CI job's docker:<version>-dind service): run the "
            "classic builder and the buildx docker driver on it too, which "
            "leave build cache there.",
        ),
    ] = False,
    engine_context: Annotated[
        str | None,
        typer.Option(
            help="Like --engine-host, with the daemon of this docker context "
            "(read from the context store, never changed).",
        ),
    ] = None,
    builders_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--builders-file",
            help="TOML file with more [builders.NAME] tables, such as remote "
            "buildkitd endpoints with TLS. Repeat for several.",
        ),
    ] = None,
    tree_oracle: Annotated[
        bool,
        typer.Option(
            "--tree-oracle/--no-tree-oracle",
            help="Compare each built file system with the tree the case implies.",
        ),
    ] = True,
    differential: Annotated[
        list[str] | None,
        typer.Option(
            help="Build each case of builder A again on B and compare the trees "
            "(A:B, each side a builder or engine/builder, such as "
            "buildx-docker:container-v0-34). Repeat for several pairs.",
        ),
    ] = None,
    secret_env: SecretEnv = None,
    log_format: LogFormat = "console",
    workdir: Workdir = DEFAULT_BASE,
) -> None:
    """Fuzz builds for a time budget and write each distinct finding.

    Exit codes: 0 no findings, 1 findings, 2 usage or environment error,
    3 (with --ci) only findings that were already known, 130 interrupted.
    """
    from buildfuzz.campaign import RunOptions, run_campaign
    from buildfuzz.report import write_reports

    _configure(log_format)
    try:
        secrets.register_environment(secret_env or [])
        _add_builder_files(builders_file or [])
        if not 1 <= jobs <= 64:
            raise UsageError(f"invalid --jobs {jobs}; use a number from 1 to 64")
        if seed is not None and not 0 <= seed < 2**64:
            raise UsageError(f"invalid --seed {seed}; use a number from 0 to 2^64-1")
        options = RunOptions(
            budget=parse_duration(budget),
            seed=seed,
            results=results,
            profile=profile,
            build_timeout=parse_duration(build_timeout, option="--build-timeout"),
            shrink_budget=parse_duration(shrink_budget, option="--shrink-budget")
            if shrink_budget is not None
            else None,
            strict=strict,
            offline=offline,
            workdir=workdir,
            shard=Shard.parse(shard),
            ci=ci,
            min_free=parse_size(min_free, option="--min-free"),
            jobs=jobs,
            engine_host=_engine_host(engine_host, engine_context),
            disposable_engine=disposable_engine,
            resume=resume,
            differential=_differential_pairs(differential or []),
            tree_oracle=tree_oracle,
        )
        summary = run_campaign(options)
        if junit or markdown or html:
            written = write_reports(
                results,
                junit=junit,
                markdown=markdown,
                html=html,
                replays=summary.regressions,
            )
            for path in written:
                typer.echo(f"report written: {path}", err=True)
    except BuildfuzzError as error:
        _fail(error)
    except OSError as error:
        _fail(_os_error(error))
    except KeyboardInterrupt:
        typer.echo("buildfuzz: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None

    stats = summary.stats
    lines = [
        "buildfuzz run summary",
        f"  seed               {summary.seed}",
        f"  profile            {summary.profile}",
        f"  elapsed            {format_duration(summary.elapsed)}"
        f" of {format_duration(summary.budget)}"
        + (" (interrupted)" if summary.interrupted else "")
        + (" (stopped early: disk space below --min-free)" if summary.low_disk else ""),
        f"  cases run          {stats.cases}",
        f"  passes             {stats.passes}",
        f"  expected failures  {stats.expected}",
        f"  findings           {summary.distinct_findings} distinct"
        f" ({len(summary.new_findings)} new, {len(summary.known_findings)} known)",
        f"  shrink builds      {stats.shrink_builds}",
        f"  skipped            {stats.skipped} (their engine, builder or scanner "
        "could not start, or the disk was too full)",
        f"  builds per minute  {summary.builds_per_minute:.1f}",
    ]
    if summary.sequences.sequences:
        sequences = summary.sequences
        lines.append(
            f"  sequences          {sequences.sequences} ({sequences.steps} steps, "
            f"{sequences.builds + sequences.shrink_builds} builds)"
        )
    for target, count in sorted(stats.per_target.items()):
        lines.append(f"  cases on {target:<36} {count}")
    if summary.regressions:
        counts = Counter(str(check.status) for check in summary.regressions)
        lines.append(
            f"  earlier findings   {len(summary.regressions)} replayed: "
            + ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        )
    for check in summary.regressions:
        lines.append(f"  regression         {check.name}: {check.status}")
    for finding_id in summary.new_findings + summary.known_findings:
        lines.append(f"  finding            {summary.results / finding_id}")
    typer.echo("\n".join(lines))
    raise typer.Exit(summary.exit_code)


@app.command()
def replay(
    path: Annotated[
        Path | None, typer.Argument(help="A finding directory or a case.json.")
    ] = None,
    all_findings: Annotated[
        bool, typer.Option("--all", help="Replay every finding in --results.")
    ] = False,
    results: Annotated[Path, typer.Option(help="Results directory for --all.")] = Path(
        "results"
    ),
    runs: Annotated[int, typer.Option(help="How many times to build each case.")] = 3,
    jobs: Annotated[
        int,
        typer.Option(
            help="With --all: findings replayed in parallel, each worker with "
            "sandbox engines of its own."
        ),
    ] = 1,
    build_timeout: Annotated[
        str, typer.Option(help="Time one build may take before it counts as a hang.")
    ] = "1m",
    secret_env: SecretEnv = None,
    log_format: LogFormat = "console",
    workdir: Workdir = DEFAULT_BASE,
) -> None:
    """Build recorded cases again and report whether they fail the same way.

    With PATH: exit 0 when a run reproduced the signature, 1 when none did.
    With --all: prints fixed, still failing or changed signature for each
    finding; exit 0 when every finding is fixed, 1 otherwise.
    """
    from buildfuzz.replay import Status, check_jobs, replay_all, replay_path

    _configure(log_format)
    try:
        secrets.register_environment(secret_env or [])
        if (path is None) == (not all_findings):
            raise UsageError("give either a finding PATH or --all, not both or neither")
        check_jobs(jobs)
        if path is not None and jobs != 1:
            raise UsageError(f"--jobs {jobs} applies to --all only; leave it out")
        timeout = parse_duration(build_timeout, option="--build-timeout")
        if path is not None:
            report = replay_path(
                path, runs=runs, build_timeout=timeout, workdir=workdir
            )
            reports = [report]
        else:
            reports = replay_all(
                results, runs=runs, build_timeout=timeout, workdir=workdir, jobs=jobs
            )
    except BuildfuzzError as error:
        _fail(error)
    except OSError as error:
        _fail(_os_error(error))
    except KeyboardInterrupt:
        typer.echo("buildfuzz: interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None

    if path is not None:
        report = reports[0]
        wanted = str(report.expected) if report.expected else "any failure"
        typer.echo(f"expected:   {wanted}")
        for attempt, signature in enumerate(report.signatures, start=1):
            typer.echo(f"run {attempt}:      {signature}")
        typer.echo(f"reproduced: {report.reproduced}/{report.runs}")
        raise typer.Exit(report.exit_code)

    for report in reports:
        typer.echo(
            f"{report.name}  {report.status:<17}  "
            f"reproduced {report.reproduced}/{report.runs}"
        )
    failing = [r for r in reports if r.status is not Status.FIXED]
    noun = "finding" if len(reports) == 1 else "findings"
    typer.echo(f"{len(reports)} {noun}: {len(failing)} not fixed")
    raise typer.Exit(1 if failing else 0)


results_app = typer.Typer(
    rich_markup_mode=None,
    help="List and show findings of a results directory.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(results_app, name="results")
ResultsOption = Annotated[
    Path, typer.Option("--results", help="Results directory to read.")
]


@results_app.callback()
def results_list(ctx: typer.Context, results: ResultsOption = Path("results")) -> None:
    """List findings: id, phase, oracle, reproduction rate, first and last seen."""
    ctx.obj = results  # `results --results DIR show ID` reads DIR too
    if ctx.invoked_subcommand is not None:
        return
    from buildfuzz.results import ResultsStore

    try:
        if not results.is_dir():
            raise UsageError(
                f"results directory {results} not found; give --results DIR"
            )
        ResultsStore.check(results)
        records = ResultsStore(results).findings()
    except BuildfuzzError as error:
        _fail(error)
    except OSError as error:
        _fail(_os_error(error))
    if not records:
        typer.echo(f"no findings in {results}")
        return
    for record in records:
        flaky = " flaky" if record.flaky else ""
        typer.echo(
            f"{record.id}  {record.phase:<10} {record.oracle:<13} "
            f"{record.reproduced}/{record.attempts}{flaky:<6}  "
            f"{record.first_seen}  {record.last_seen}  x{record.count}  "
            f"{record.message[:80]}"
        )


@results_app.command("show")
def results_show(
    ctx: typer.Context,
    finding_id: Annotated[str, typer.Argument(help="The finding id.")],
    results: Annotated[
        Path | None, typer.Option("--results", help="Results directory to read.")
    ] = None,
) -> None:
    """Print one finding's README."""
    results = results or ctx.obj or Path("results")
    page = results / finding_id / "README.md"
    if not (results / finding_id / "finding.json").exists():
        _fail(UsageError(f"finding {finding_id!r} not found in {results}"))
    try:
        typer.echo(page.read_text())
    except OSError as error:
        _fail(UsageError(f"cannot read {page}: {error}"))


@results_app.command("merge")
def results_merge(
    directories: Annotated[
        list[Path],
        typer.Argument(metavar="DIR", help="Results directories, one per shard."),
    ],
    into: Annotated[
        Path, typer.Option("--into", help="Results directory to write the merge to.")
    ],
) -> None:
    """Merge the results directories of several shards into one."""
    from buildfuzz.results_merge import merge_results

    try:
        summary = merge_results(directories, into)
    except BuildfuzzError as error:
        _fail(error)
    except OSError as error:
        _fail(_os_error(error))
    typer.echo(summary.describe())


@app.command()
def setup(
    engine: Annotated[
        list[str] | None, typer.Option(help="Engine to fetch (default: all defined).")
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            help="Also build the BuildKit versions this profile's builders use."
        ),
    ] = "default",
    quiet: Annotated[
        bool, typer.Option(help="Print nothing when everything is already there.")
    ] = False,
    log_format: LogFormat = "console",
) -> None:
    """Download engines and client, and build BuildKit, into the cache."""
    from buildfuzz.campaign import usable_builders
    from buildfuzz.definitions import load_definitions
    from buildfuzz.install import ensure_installed
    from buildfuzz.profile import load_profile

    _configure(log_format)
    try:
        definitions = load_definitions()
        names = engine or sorted(definitions.engines)
        unknown = [name for name in names if name not in definitions.engines]
        if unknown:
            raise UsageError(
                f"unknown engine {unknown[0]!r}; defined engines: "
                f"{', '.join(sorted(definitions.engines))}"
            )
        chosen = load_profile(profile)
        builders = usable_builders(definitions, chosen)
        ensure_installed(
            definitions,
            names,
            builders,
            chosen.dockerfile.bases,
            chosen.build.attestations,
        )
    except BuildfuzzError as error:
        _fail(error)
    except OSError as error:
        _fail(_os_error(error))
    if not quiet:
        typer.echo(
            f"ready: client, busybox base, engines {', '.join(names)}, "
            f"builders of profile {profile}"
        )


@app.command()
def sandbox(
    engine: Annotated[str, typer.Option(help="Engine to start.")] = "26.1",
    workdir: Workdir = DEFAULT_BASE,
) -> None:
    """Start a sandbox engine for repro.sh and wait; Ctrl-C stops and removes it.

    It prints the DOCKER_HOST and DOCKER_CONFIG (with the buildx plugin) to
    export in another shell.
    """
    import time

    from buildfuzz.baseimage import import_busybox
    from buildfuzz.client import ClientTools
    from buildfuzz.client_user import UserClient
    from buildfuzz.definitions import load_definitions
    from buildfuzz.dind import sandbox_engine
    from buildfuzz.install import (
        CLIENT_TREE,
        busybox_binary,
        engine_tree_name,
        ensure_installed,
    )
    from buildfuzz.packages import tree_path
    from buildfuzz.workdir import create_run_dir, remove_tree

    _configure("console")
    try:
        definitions = load_definitions()
        if engine not in definitions.engines:
            raise UsageError(
                f"unknown engine {engine!r}; defined engines: "
                f"{', '.join(sorted(definitions.engines))}"
            )
        ensure_installed(definitions, [engine])
        run_dir = create_run_dir(workdir)
    except BuildfuzzError as error:
        _fail(error)
    try:
        tools = ClientTools.prepare(tree_path(CLIENT_TREE), run_dir)
        daemon = sandbox_engine(
            definitions.engines[engine], tree_path(engine_tree_name(engine)), run_dir
        )
        daemon.start()
        import_busybox(tools.docker(daemon.host), Path(busybox_binary()), run_dir)
        # The repro.sh of a case with a non-root client runs these as that user.
        cli, config = UserClient(run_dir).share(
            tools.cli, tools.config_dir, daemon.host
        ) or (tools.cli, tools.config_dir)
        typer.echo(f"export DOCKER_HOST={daemon.host}")
        typer.echo(f"export DOCKER_CONFIG={config}")
        typer.echo(f"export PATH={cli.parent}:$PATH")
        typer.echo("# sandbox engine running; press Ctrl-C to stop and remove it")
        while daemon.is_healthy():
            time.sleep(1)
        typer.echo("buildfuzz: the sandbox engine stopped", err=True)
    except KeyboardInterrupt:
        pass
    except BuildfuzzError as error:
        remove_tree(run_dir)
        _fail(error)
    remove_tree(run_dir)


builders_app = typer.Typer(
    help="Engines and builders buildfuzz can run.", rich_markup_mode=None
)
app.add_typer(builders_app, name="builders")


@builders_app.command("list")
def builders_list() -> None:
    """Print every defined engine and builder, and whether it is usable here."""
    from rich.console import Console
    from rich.table import Table

    from buildfuzz.definitions import load_definitions
    from buildfuzz.inventory import all_entries

    try:
        entries = all_entries(load_definitions())
    except BuildfuzzError as error:
        _fail(error)
    except OSError as error:
        _fail(_os_error(error))
    table = Table("kind", "name", "version", "usable", "why not")
    for entry in entries:
        table.add_row(
            entry.kind,
            entry.name,
            entry.version,
            "yes" if entry.usable else "no",
            entry.reason,
        )
    Console(width=200).print(table)


@app.command()
def doctor(
    profile: Annotated[
        str, typer.Option(help="Profile whose needs are checked.")
    ] = "default",
) -> None:
    """Check this machine; exit 0 when the profile can run, 1 when not."""
    from rich.console import Console
    from rich.table import Table

    from buildfuzz.definitions import load_definitions
    from buildfuzz.doctor import default_profile_ready, run_checks
    from buildfuzz.profile import load_profile

    try:
        checks = run_checks(load_definitions(), load_profile(profile))
    except BuildfuzzError as error:
        _fail(error)
    except OSError as error:
        _fail(_os_error(error))
    table = Table("check", "status", "found", "fix")
    for check in checks:
        table.add_row(
            check.name, check.status, check.detail, "" if check.ok else check.fix
        )
    Console(width=200).print(table)
    ready = default_profile_ready(checks)
    typer.echo(f"profile {profile}: {'ready' if ready else 'NOT ready'}")
    raise typer.Exit(0 if ready else 1)


@app.command()
def version() -> None:
    """Print the buildfuzz version."""
    typer.echo(__version__)


app.command("report")(report_command)
app.command("strategies")(strategies_command)


def main() -> None:
    # Commands without --log-format log to stderr too; the others set it again.
    logs.configure("console")
    try:
        app()
    except KeyboardInterrupt:
        print("buildfuzz: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
