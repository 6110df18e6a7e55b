"""Sequences: build, change the context, rebuild with the cache, prune, rebuild.

Some failures show only on a second build, or only on the first. A
``SequenceMachine`` (a Hypothesis rule-based state machine) starts from a
case of the profile on one engine and builder, with the builder's build
cache pruned, and then runs steps: build; edit a context file's content,
size, mode, mtime or owner; add or delete a file; draw a new Dockerfile or
.dockerignore; prune the builder's build cache. Every build step builds the
current case twice: with the builder's cache, and with ``--no-cache``, a
build of the same state from scratch. ``oracle_sequence`` compares the two.

Hypothesis shrinks a failing sequence, its steps and its first case alike.
Every step stores the whole case after it, so a step list replays without
Hypothesis (``replay_steps``) and ``sequence_repro`` turns it into a script.

Limits:

* Only BuildKit builders run sequences: after each build the runner
  removes the image together with its untagged parents, which is the whole
  cache of the classic builder.
* Sequences run only with the tree oracle on. Its pruning of BuildKit's
  copy of each context (``CaseRunner.forget_contexts``) keeps BuildKit from
  sending an edited file of the same size, mtime and mode from an earlier
  build, so each build reads its own context, as the plain fuzzer's cases do.
"""

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from hypothesis import HealthCheck, Verbosity, seed, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from buildfuzz.base_formats import unusable_bases
from buildfuzz.build import BuildResult
from buildfuzz.case import Case, ContextFile, FileKind, Output, case_from_dict
from buildfuzz.errors import DataFileError, EngineError
from buildfuzz.oracle_result import model, read_result
from buildfuzz.oracle_sequence import BuildOutcome, Mismatch, compare_outcomes
from buildfuzz.oracle_tree import Tree
from buildfuzz.profile import LOCAL_BASES, Profile
from buildfuzz.session import EngineUnavailable, Session
from buildfuzz.shard import Shard
from buildfuzz.signature import Signature
from buildfuzz.strategies import Target, case_platforms, cases
from buildfuzz.strategies_context import (
    RESERVED_NAMES,
    _entry,
    _place,
    dockerignore_patterns,
)
from buildfuzz.strategies_dockerfile import dockerfiles
from buildfuzz.verdict import judge

log = structlog.get_logger(__name__)

START = "start"
BUILD = "build"
EDIT = "edit"
ADD = "add"
DELETE = "delete"
DOCKERFILE = "dockerfile"
DOCKERIGNORE = "dockerignore"
PRUNE = "prune"
ACTIONS = (START, BUILD, EDIT, ADD, DELETE, DOCKERFILE, DOCKERIGNORE, PRUNE)

# Small contexts: a sequence builds every state twice.
MAX_FILES = 4
MAX_SIZE = 1 << 20
MAX_SPARSE_SIZE = 64 * (1 << 20) + 1
# Kinds left out: FIFOs hang builders until the build timeout, and repro.sh
# cannot recreate a socket.
LEFT_OUT_KINDS = (FileKind.FIFO, FileKind.SOCKET)
SEQUENCE_OUTPUTS = (Output.LOAD, Output.TAR, Output.LOCAL)  # repro.sh reads these
CONFIRM_RUNS = 2  # replays of the shrunk sequence that measure its reproduction rate
FLAKY_BELOW = 0.8
PRUNE_TIMEOUT = 120.0  # seconds


@dataclass(frozen=True)
class Step:
    """One step of a sequence and the case (the state) after it."""

    action: str  # one of ACTIONS
    description: str
    case: Case

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "description": self.description,
            "case": self.case.to_dict(),
        }


def steps_json(steps: list[Step]) -> str:
    return json.dumps([step.to_dict() for step in steps], indent=2) + "\n"


def steps_from_json(text: str, *, source: Path | str = "<steps>") -> list[Step]:
    """Read a step list that ``steps_json`` wrote; raise DataFileError if invalid."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFileError(source, f"steps are not valid JSON: {error.msg}") from None
    if not isinstance(data, list):
        raise DataFileError(source, "steps must be a JSON list")
    steps = []
    for item in data:
        if not isinstance(item, dict) or set(item) != {"action", "description", "case"}:
            raise DataFileError(
                source, "each step must be an object of action, description and case"
            )
        if item["action"] not in ACTIONS:
            raise DataFileError(
                source,
                f"unknown step action {item['action']!r}; "
                f"known actions: {', '.join(ACTIONS)}",
            )
        case = case_from_dict(item["case"], source=source)
        steps.append(Step(item["action"], str(item["description"]), case))
    return steps


def sequence_profile(profile: Profile) -> Profile:
    """Return ``profile`` cut down to small, quick contexts for sequences."""
    context = profile.context
    kinds = tuple(kind for kind in context.kinds if kind not in LEFT_OUT_KINDS)
    sparse_sizes = tuple(s for s in context.sparse_sizes if s <= MAX_SPARSE_SIZE)
    if not sparse_sizes:
        kinds = tuple(kind for kind in kinds if kind is not FileKind.SPARSE)
    context = replace(
        context,
        max_files=min(context.max_files, MAX_FILES),
        kinds=kinds or (FileKind.FILE,),
        sizes=tuple(s for s in context.sizes if s <= MAX_SIZE) or (0,),
        sparse_sizes=sparse_sizes or context.sparse_sizes,
        path_lengths=(0,),
        bulk_files=(0,),
    )
    dockerfile = replace(
        profile.dockerfile,
        bases=tuple(b for b in profile.dockerfile.bases if b in LOCAL_BASES)
        or ("scratch",),
        layers=(0,),
        max_instructions=min(profile.dockerfile.max_instructions, 4),
    )
    build = replace(
        profile.build,
        outputs=tuple(o for o in profile.build.outputs if o in SEQUENCE_OUTPUTS)
        or (Output.LOAD,),
        no_cache=(False,),
    )
    return replace(profile, context=context, dockerfile=dockerfile, build=build)


def sequence_targets(
    targets: tuple[Target, ...], session: Session
) -> tuple[Target, ...]:
    """Return the targets whose builder keeps a build cache between builds."""
    builders = session.definitions.builders
    return tuple(target for target in targets if not builders[target.builder].classic)


@dataclass
class SequenceStats:
    sequences: int = 0
    steps: int = 0
    builds: int = 0
    shrink_builds: int = 0

    def add(self, other: "SequenceStats") -> None:
        self.sequences += other.sequences
        self.steps += other.steps
        self.builds += other.builds
        self.shrink_builds += other.shrink_builds


@dataclass
class SequenceFinding:
    """A sequence whose cached build disagreed with the build from scratch."""

    signature: Signature
    mismatch: Mismatch
    steps: list[Step]  # the shortest failing sequence
    original_steps: list[Step]  # the sequence as first generated
    cached: BuildOutcome
    scratch: BuildOutcome
    new: bool
    shrunk: bool = False
    complete: bool = False  # shrinking ran to its end within its budget
    shrink_builds: int = 0
    reproduced: int = 0
    attempts: int = 0
    interrupted: bool = False

    @property
    def flaky(self) -> bool:
        return self.attempts > 0 and self.reproduced / self.attempts < FLAKY_BELOW


class SequenceFailure(Exception):
    """Raised inside a sequence when its cached build disagrees with scratch."""

    def __init__(
        self,
        mismatch: Mismatch,
        steps: list[Step],
        cached: BuildOutcome,
        scratch: BuildOutcome,
    ) -> None:
        super().__init__(str(mismatch.signature))
        self.mismatch = mismatch
        self.steps = steps
        self.cached = cached
        self.scratch = scratch


class _Stop(BaseException):
    """Ends Hypothesis' run at once: a budget is spent or the engine is gone.

    Hypothesis records an ``Exception`` as a failure and shrinks it, but
    lets other ``BaseException`` types through.
    """


class SequenceMachine(RuleBasedStateMachine):
    """The state: the current case. Each rule changes it, builds it or prunes."""

    runner: "SequenceRunner"  # set on the class that SequenceRunner makes

    def __init__(self) -> None:
        super().__init__()
        self.case = Case()
        self.steps: list[Step] = []
        self.built = False  # a build happened since the start or the last prune

    def _record(self, action: str, description: str, case: Case) -> None:
        self.case = case
        self.steps.append(Step(action, description, case))
        self.runner.stats.steps += 1

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        case = data.draw(self.runner.strategy, label="case")
        case = case.with_changes(no_cache=False)
        self.runner.prune(case)
        self._record(START, "start from an empty build cache", case)

    @rule()
    def build(self) -> None:
        self._record(BUILD, "build with the cache, then with --no-cache", self.case)
        self.runner.check_build(self.steps)
        self.built = True

    @precondition(lambda self: self.built)
    @rule()
    def prune(self) -> None:
        self.runner.prune(self.case)
        self._record(PRUNE, "prune the builder's build cache", self.case)
        self.built = False

    @precondition(lambda self: bool(_editable(self.case.files)))
    @rule(data=st.data())
    def edit_file(self, data: st.DataObject) -> None:
        files = self.case.files
        entry = files[data.draw(st.sampled_from(_editable(files)), label="file")]
        attribute = data.draw(st.sampled_from(_attributes(entry)), label="attribute")
        changes, text = _draw_change(data, self.runner.profile, entry, attribute)
        changed = _change_group(files, entry, changes)
        self._record(
            EDIT, f"{text} of {entry.path!r}", self.case.with_changes(files=changed)
        )

    @precondition(lambda self: len(self.case.files) < MAX_FILES + 2)
    @rule(data=st.data())
    def add_file(self, data: st.DataObject) -> None:
        files = self.case.files
        reserved = RESERVED_NAMES | {self.case.dockerfile_name.split("/")[0]}
        entry = data.draw(_entry(self.runner.profile), label="entry")
        placed = _place(entry, list(files), {f.path for f in files}, reserved)
        if placed is None:
            return  # the path clashes with an existing one
        self._record(
            ADD,
            f"add {placed.kind} {placed.path!r}",
            self.case.with_changes(files=(*files, placed)),
        )

    @precondition(lambda self: bool(_deletable(self.case)))
    @rule(data=st.data())
    def delete_file(self, data: st.DataObject) -> None:
        files = self.case.files
        index = data.draw(st.sampled_from(_deletable(self.case)), label="file")
        remaining = files[:index] + files[index + 1 :]
        self._record(
            DELETE,
            f"delete {files[index].path!r}",
            self.case.with_changes(files=remaining),
        )

    @rule(data=st.data())
    def change_dockerfile(self, data: st.DataObject) -> None:
        runner = self.runner
        case = self.case
        target = runner.target_of(case)
        excluded = unusable_bases(
            engine=case.engine,
            containerd_store=case.containerd_store,
            engine_store=target.engine_store,
            registry=target.registry,
        )
        dockerfile = data.draw(
            dockerfiles(
                runner.profile,
                case.files,
                name_stages=bool(case.target),
                dockerfile_name=case.dockerfile_name,
                excluded_bases=excluded,
                secret_ids=tuple(secret_id for secret_id, _ in case.build_secrets),
            ),
            label="dockerfile",
        )
        platforms = case_platforms(runner.profile.build.platforms, dockerfile)
        platform = case.platform if case.platform in platforms else platforms[0]
        self._record(
            DOCKERFILE,
            "change the Dockerfile to: " + " / ".join(dockerfile),
            case.with_changes(dockerfile=dockerfile, platform=platform),
        )

    @rule(data=st.data())
    def change_dockerignore(self, data: st.DataObject) -> None:
        patterns = data.draw(
            dockerignore_patterns(self.runner.profile), label="dockerignore"
        )
        text = (
            "remove .dockerignore"
            if patterns is None
            else ("write .dockerignore: " + " ".join(patterns))
        )
        self._record(DOCKERIGNORE, text, self.case.with_changes(dockerignore=patterns))


# Kinds whose attributes a step can edit, and what it may edit for each.
_SIZED = (FileKind.FILE, FileKind.ARCHIVE, FileKind.HARDLINK)


def _editable(files: tuple[ContextFile, ...]) -> list[int]:
    return [index for index, entry in enumerate(files) if _attributes(entry)]


def _attributes(entry: ContextFile) -> tuple[str, ...]:
    kind = entry.kind
    if kind is FileKind.SYMLINK:
        return ("mtime", "owner")  # a symlink has no mode of its own
    attributes: tuple[str, ...] = ("mode", "mtime", "owner")
    if kind in _SIZED:
        attributes = ("content", "size", *attributes)
    elif kind is FileKind.SPARSE:
        attributes = ("size", *attributes)
    return attributes


def _draw_change(
    data: st.DataObject, profile: Profile, entry: ContextFile, attribute: str
) -> tuple[dict[str, Any], str]:
    """Draw a new value of ``attribute``; return the changes and their description."""
    axes = profile.context
    if attribute == "content":
        new_seed = data.draw(
            st.integers(0, 255).filter(lambda value: value != entry.seed), label="seed"
        )
        return {"seed": new_seed}, "change the content (same size)"
    if attribute == "size":
        pool = axes.sparse_sizes if entry.kind is FileKind.SPARSE else axes.sizes
        size = data.draw(st.sampled_from(pool), label="size")
        return {"size": size}, f"change the size to {size}"
    if attribute == "mode":
        pool = axes.dir_modes if entry.kind is FileKind.DIR else axes.modes
        mode = data.draw(st.sampled_from(pool), label="mode")
        return {"mode": mode}, f"chmod {mode:04o}"
    if attribute == "mtime":
        mtime = data.draw(st.sampled_from(axes.mtimes_ns), label="mtime")
        return {"mtime_ns": mtime}, f"set the mtime to {mtime} ns"
    uid = data.draw(st.sampled_from(axes.owners), label="uid")
    gid = data.draw(st.sampled_from(axes.owners), label="gid")
    return {"uid": uid, "gid": gid}, f"chown {uid}:{gid}"


def _change_group(
    files: tuple[ContextFile, ...], entry: ContextFile, changes: dict[str, Any]
) -> tuple[ContextFile, ...]:
    """Apply ``changes`` to ``entry`` and to every hardlink of the same inode."""
    root = entry.target if entry.kind is FileKind.HARDLINK else entry.path
    changed = []
    for other in files:
        same_inode = other.path == root or (
            other.kind is FileKind.HARDLINK and other.target == root
        )
        changed.append(replace(other, **changes) if same_inode else other)
    return tuple(changed)


def _deletable(case: Case) -> list[int]:
    """Entries whose removal keeps the case buildable as it was drawn.

    A directory with entries under it stays, and so do the sources of
    hardlinks and the files a COPY or ADD names.
    """
    files = case.files
    indices = []
    for index, entry in enumerate(files):
        if any(other.path.startswith(entry.path + "/") for other in files):
            continue
        if any(o.kind is FileKind.HARDLINK and o.target == entry.path for o in files):
            continue
        if _named_in(entry.path, case.dockerfile):
            continue
        indices.append(index)
    return indices


def _named_in(path: str, dockerfile: tuple[str, ...]) -> bool:
    """Return whether a COPY or ADD of ``dockerfile`` names ``path`` as a source."""
    plain = f" {path} /"
    quoted = "[" + json.dumps(path, ensure_ascii=False) + ","
    return any(plain in element or quoted in element for element in dockerfile)


class SequenceRunner:
    """Run sequences on a session's engines until a deadline; shrink what fails."""

    def __init__(
        self,
        session: Session,
        profile: Profile,
        targets: tuple[Target, ...],
        *,
        seed: int,
        known: Callable[[Signature], bool],
        on_finding: Callable[[SequenceFinding], None],
        may_continue: Callable[[], bool] = lambda: True,
        case_filter: Callable[[Case], bool] | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.session = session
        self.profile = sequence_profile(profile)
        self.targets = sequence_targets(targets, session)
        self.seed = seed
        self.known = known
        self.on_finding = on_finding
        self.may_continue = may_continue
        self.shard = shard or Shard(1, 1)
        self.stats = SequenceStats()
        self.interrupted = False
        strategy = cases(self.profile, self.targets) if self.targets else None
        if strategy is not None and case_filter is not None:
            strategy = strategy.filter(case_filter)
        self.strategy: Any = strategy
        # Per sequence: the signature being shrunk, the shortest failure so
        # far, and when shrinking must stop.
        self._target: Signature | None = None
        self._best: SequenceFailure | None = None
        self._first: SequenceFailure | None = None
        self._stop_at = 0.0
        self._shrink_budget = 0.0
        self._known_hit = False
        self._unusable: str | None = None

    def machine(self, sequence_seed: str) -> type[SequenceMachine]:
        """Return a machine class bound to this runner and seeded for one sequence."""
        machine = type("Sequence", (SequenceMachine,), {"runner": self})
        return seed(sequence_seed)(machine)

    def run(self, deadline: float, shrink_budget: float) -> SequenceStats:
        """Run sequences until ``deadline``; report each mismatch to on_finding."""
        if self.strategy is None:
            log.warning("no builder of this run keeps a build cache; no sequences")
            return self.stats
        if not self.session.oracles.compares_content:
            log.warning("sequences need the tree oracle; no sequences")
            return self.stats
        # NOTE: --continue resumes the cases only; sequences start again from
        # the first one of the seed.
        index = self.shard.index - 1
        while time.monotonic() < deadline and self.may_continue():
            self.run_one(f"{self.seed}:sequence:{index}", deadline, shrink_budget)
            index += self.shard.count
            if self.interrupted or self._unusable is not None:
                break
        return self.stats

    def run_one(
        self, sequence_seed: str, deadline: float, shrink_budget: float
    ) -> None:
        """Run one sequence; shrink and report it when it fails."""
        self._target = self._best = self._first = None
        self._known_hit = False
        shrink_builds_before = self.stats.shrink_builds
        self._stop_at = deadline
        self._shrink_budget = shrink_budget
        self.stats.sequences += 1
        try:
            run_state_machine_as_test(
                self.machine(sequence_seed), settings=self._settings()
            )
        except (SequenceFailure, _Stop, HypothesisException, ExceptionGroup):
            pass  # the shortest failure is in self._best
        except KeyboardInterrupt:
            log.warning("sequence interrupted; keeping what it found so far")
            self.interrupted = True
        self._report(self.stats.shrink_builds - shrink_builds_before)

    def _settings(self) -> settings:
        # Given in full: Hypothesis' ci profile and its 200 ms deadline would
        # break multi-second steps (see fuzzer.py). One example per call, so
        # that the caller's loop decides when to stop.
        return settings(
            database=None,
            deadline=None,
            derandomize=False,
            max_examples=1,
            stateful_step_count=self.profile.sequences.max_steps,
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=False,
            verbosity=Verbosity.quiet,
            phases=[HypothesisPhase.generate, HypothesisPhase.shrink],
        )

    def _report(self, shrink_builds: int) -> None:
        first, best = self._first, self._best
        if first is None:
            return
        signature = first.mismatch.signature
        if self._known_hit or best is None:
            self.on_finding(
                SequenceFinding(
                    signature,
                    first.mismatch,
                    first.steps,
                    first.steps,
                    first.cached,
                    first.scratch,
                    new=False,
                )
            )
            return
        finding = SequenceFinding(
            signature,
            best.mismatch,
            best.steps,
            first.steps,
            best.cached,
            best.scratch,
            new=True,
            shrunk=len(best.steps) < len(first.steps) or best is not first,
            complete=time.monotonic() < self._stop_at and not self.interrupted,
            shrink_builds=shrink_builds,
            interrupted=self.interrupted,
        )
        if not self.interrupted:
            self.confirm(finding)
        log.info(
            "sequence finding",
            signature=str(signature),
            id=signature.id,
            steps=len(finding.steps),
            reproduced=f"{finding.reproduced}/{finding.attempts}",
        )
        self.on_finding(finding)

    def confirm(self, finding: SequenceFinding) -> None:
        """Replay the shrunk steps to measure how often they reproduce."""
        for _ in range(CONFIRM_RUNS):
            if time.monotonic() >= self._stop_at:
                break
            try:
                mismatch = self.replay(finding.steps)
            except (EngineError, EngineUnavailable):
                break
            finding.attempts += 1
            if mismatch is not None and mismatch.signature == finding.signature:
                finding.reproduced += 1

    def replay(self, steps: list[Step]) -> Mismatch | None:
        """Run recorded steps again; return the first mismatch of a build step."""
        for step in steps:
            if step.action in (START, PRUNE):
                self.prune(step.case)
            elif step.action == BUILD:
                mismatch, _, _ = self.build_pair(step.case)
                if mismatch is not None:
                    return mismatch
        return None

    def target_of(self, case: Case) -> Target:
        return next(
            t
            for t in self.targets
            if (t.engine, t.builder) == (case.engine, case.builder)
        )

    def check_build(self, steps: list[Step]) -> None:
        """Build the last step's case twice and raise when the builds disagree."""
        now = time.monotonic()
        if now >= self._stop_at:
            raise _Stop  # the run's budget or this finding's shrink budget is spent
        mismatch, cached, scratch = self.build_pair(steps[-1].case)
        if mismatch is None:
            return
        failure = SequenceFailure(mismatch, list(steps), cached, scratch)
        if self._target is None:
            self._target = mismatch.signature
            self._first = failure
            if self.known(mismatch.signature):
                self._known_hit = True
                raise _Stop  # known: not shrunk again
            self._best = failure
            self._stop_at = min(self._stop_at, now + self._shrink_budget)
            log.info("shrinking sequence finding", signature=str(mismatch.signature))
            raise failure
        if mismatch.signature != self._target:
            return  # another mismatch while shrinking: not the one being shrunk
        assert self._best is not None
        if len(steps) <= len(self._best.steps):
            self._best = failure
        raise failure

    def build_pair(
        self, case: Case
    ) -> tuple[Mismatch | None, BuildOutcome, BuildOutcome]:
        cached = self.build(case)
        scratch = self.build(case.with_changes(no_cache=True))
        notes: list[str] = []
        expected = model(case, notes, classic=False)
        return compare_outcomes(cached, scratch, expected), cached, scratch

    def build(self, case: Case) -> BuildOutcome:
        """Build ``case`` on its builder, keeping the cache; read its tree."""
        session = self.session
        trees: list[Tree] = []

        def read(result: BuildResult, case_dir: Path) -> None:
            if result.succeeded:
                tree = read_tree(case, case_dir, session.oracles.docker_for(case))
                if tree is not None:
                    trees.append(tree)

        rebuild = session.oracles.rebuild
        assert rebuild is not None  # the session sets it
        try:
            result = rebuild(case, read)
        except EngineError as error:
            self._unusable = str(error)
            log.warning("sequence engine unavailable", error=str(error)[:300])
            raise _Stop from None
        if self._target is None:
            self.stats.builds += 1
        else:
            self.stats.shrink_builds += 1
        self._check_engine(case, result)
        signature = None
        if not result.succeeded:
            signature = judge(
                case, result, classic=False, rules=session.rules, strict=session.strict
            ).signature
        return BuildOutcome(case, result, trees[0] if trees else None, signature)

    def _check_engine(self, case: Case, result: BuildResult) -> None:
        """End the sequence after a hang, and end all sequences if the daemon died.

        Hangs and daemon deaths are the plain fuzzer's findings: its session
        restarts the engine after them, which sequences do not.
        """
        if result.succeeded:
            return
        if not self.session.engine(case).is_healthy():
            self._unusable = f"the engine {case.engine_label} stopped answering"
            log.warning("engine died during a sequence; no more sequences")
            raise _Stop
        if result.timed_out:
            log.warning("a sequence build timed out; ending the sequence")
            raise _Stop

    def prune(self, case: Case) -> None:
        """Remove the whole build cache of the case's builder."""
        session = self.session
        try:
            engine = session.engine(case)
        except EngineUnavailable as error:
            self._unusable = str(error)
            raise _Stop from None
        definition = session.definitions.builders[case.builder]
        docker = session.tools_for(definition).docker(engine.host)
        command = [*docker.docker_cmd, "buildx", "prune", "--all", "--force"]
        name = session.pool.builder(engine.label, docker, definition)
        if name is not None:
            command += ["--builder", name]
        try:
            completed = subprocess.run(
                command, capture_output=True, timeout=PRUNE_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            log.warning("pruning the build cache timed out", builder=case.builder)
            raise _Stop from None
        if completed.returncode != 0:
            log.warning(
                "could not prune the build cache",
                builder=case.builder,
                error=completed.stderr.decode(errors="replace").strip()[-300:],
            )
            raise _Stop


def replay_steps(
    session: Session, steps: list[Step], profile: Profile
) -> Mismatch | None:
    """Run a recorded sequence again on ``session``; return its first mismatch.

    A sequence cut short (its engine died, a build hung) returns None.
    """
    first = steps[0].case
    definition = session.definitions.builders[first.builder]
    target = Target(first.engine, first.builder, definition.outputs)
    runner = SequenceRunner(
        session,
        profile,
        (target,),
        seed=0,
        known=lambda signature: False,
        on_finding=lambda finding: None,
    )
    runner._stop_at = float("inf")
    try:
        return runner.replay(steps)
    except _Stop:
        return None


def read_tree(case: Case, case_dir: Path, docker: Any) -> Tree | None:
    """Read a sequence build's tree; tests replace it to plant a fault."""
    return read_result(case, case_dir, docker)


__all__ = [
    "ACTIONS",
    "SequenceFinding",
    "SequenceMachine",
    "SequenceRunner",
    "SequenceStats",
    "Step",
    "replay_steps",
    "sequence_profile",
    "steps_from_json",
    "steps_json",
]
