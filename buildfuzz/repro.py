"""Write ``repro.sh``: a standalone reproduction that needs only docker.

The script recreates the context with plain shell commands (file content
is a 64-byte block repeated, see ``context.content_block``), imports the
busybox base from a payload appended to the script when the case uses it,
runs the same docker command that buildfuzz ran, and checks the log for
the finding's error message. A registry base (``base_formats``) is built
again from another payload and pushed to the registry that BASE_REGISTRY
names; without that variable the script prints what to set and exits 2.
The same holds for a case with an SBOM attestation and SBOM_GENERATOR, the
generator image that its ``--sbom`` flag names.

Besides bash and coreutils, a case with extended attributes needs
``setfattr`` (Debian package ``attr``); the script checks for it first. A
unix socket in the context is not recreated: no common shell tool leaves a
socket node behind, so the script says so and goes on without it.
"""

import base64
import io
import os
import posixpath
import re
import shlex
import stat
import tarfile
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from buildfuzz import secrets
from buildfuzz.base_formats import TAG, BaseFormat, formats_in
from buildfuzz.base_publisher import write_base_context
from buildfuzz.baseimage import busybox_rootfs_tar
from buildfuzz.build import IMAGE_NAME, PUSH_REPOSITORY, push_output, tar_command
from buildfuzz.bulk import BULK_MTIME_NS
from buildfuzz.bulk import shell_commands as bulk_shell_commands
from buildfuzz.case import BulkRecipe, Case, ContextFile, FileKind, Output
from buildfuzz.churn import churn_target
from buildfuzz.context import archive_content, content_block
from buildfuzz.definitions import BuilderDefinition
from buildfuzz.sbom_scanner import SCANNER_MODULE, SCANNER_VERSION, needs_scanner
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import BUSYBOX_IMAGE

PAYLOAD_MARKER = "__BUSYBOX_ROOTFS_BASE64__"
# The variable that names the SBOM generator image of a case with an SBOM.
SBOM_VARIABLE = "SBOM_GENERATOR"
BASE_PAYLOAD_MARKER = "__BUILDFUZZ_BASE_CONTEXT_BASE64__"
BASE_PAYLOAD_END = "__BUILDFUZZ_BASE_CONTEXT_END__"
# Paths longer than this many bytes are reached with a chain of cd commands,
# because "$ctx" plus the path could pass PATH_MAX (4096 bytes).
LONG_PATH_BYTES = 1024
# The value of a secret whose variable the user of repro.sh did not set.
PLACEHOLDER_SECRET = "buildfuzz-placeholder-secret"
_PLACEHOLDER = re.compile(
    r'"<q>"|\'<q>\'|<(?:n|digest|id|path|ref|time|dur|q|uuid|image|name)>'
)


def signature_pattern(signature: Signature) -> str:
    """Return an extended regular expression matching the raw error text."""
    parts = []
    position = 0
    for match in _PLACEHOLDER.finditer(signature.message):
        parts.append(re.escape(signature.message[position : match.start()]))
        parts.append(".*")
        position = match.end()
    parts.append(re.escape(signature.message[position:]))
    pattern = "".join(parts)
    # Normalisation folded runs of white space into one space.
    return re.sub(r"(\\ )+", "[[:space:]]+", pattern).replace("\\-", "-")


def ansi_quote(text: str) -> str:
    """Quote ``text`` as a bash $'...' string that holds any byte but NUL."""
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        char = chr(byte)
        if 32 <= byte < 127 and char not in "'\\":
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return "$'" + "".join(out) + "'"


# A shell function that writes a context file's content; it uses $work.
FILL_FUNCTION = (
    "fill() {  # fill PATH SIZE BLOCK: BLOCK repeated up to SIZE bytes",
    '  printf "$3" > "$work/block"',
    '  : > "$work/big"',
    '  while [ "$(stat -c %s "$work/big")" -lt "$2" ]; do',
    '    cat "$work/block" >> "$work/big"',
    '    cat "$work/big" "$work/big" > "$work/twice"',
    '    mv "$work/twice" "$work/big"',
    "  done",
    '  head -c "$2" "$work/big" > "$1"',
    "}",
)


def render_repro(case: Case, signature: Signature, *, timeout: float) -> str:
    """Return the text of ``repro.sh`` for ``case`` failing with ``signature``."""
    uses_busybox = any(BUSYBOX_IMAGE in line for line in case.dockerfile)
    bases = formats_in(case.dockerfile)
    base_tags = tuple(base.image for base in bases)
    extra_tags = "".join(f" {shlex.quote(tag)}" for tag in case.tags + base_tags)
    lines = [
        "#!/usr/bin/env bash",
        "# Reproduction written by buildfuzz; it needs only docker (and the buildx",
        "# plugin for BuildKit builds). It uses the daemon that docker talks to",
        "# (DOCKER_HOST or the current context), builds one image, removes what",
        "# it created, and exits 0 when the failure reproduced, 1 when not.",
        f"# Signature ({signature.phase}): {signature.message}",
        "set -u",
        'work=$(mktemp -d "${TMPDIR:-/tmp}/buildfuzz-repro.XXXXXX")',
        f"image={IMAGE_NAME}-repro:latest",
        "cleanup() {",
        f'  docker image rm -f "$image"{extra_tags} >/dev/null 2>&1',
        '  rm -rf "$work"',
        "}",
        "trap cleanup EXIT",
        "",
        *FILL_FUNCTION,
        "",
        'ctx="$work/context"',
        'mkdir "$ctx"',
        *_tool_checks(case),
        *_context_commands(case),
        *_dockerfile_commands(case),
    ]
    if uses_busybox:
        lines += _busybox_import()
    if bases:
        lines += _registry_base_commands(case, bases)
    elif case.output is Output.PUSH:
        lines += _registry_check("the case pushes its image there")

    lines += _sbom_check(case)
    lines += _secret_commands(case)
    lines += ["", *_build_commands(case, timeout), *_verdict(signature)]
    script = "\n".join(lines) + "\n"
    # The base payload goes first: the busybox one runs to the end of the file.
    if bases:
        script += _base_payload(bases)
    if uses_busybox:
        script += _busybox_payload()
    return script


def _tool_checks(case: Case) -> list[str]:
    if not any(entry.xattrs for entry in case.files):
        return []
    return [
        "command -v setfattr >/dev/null || {",
        '  echo "repro.sh: setfattr not found; install it (Debian package attr)" >&2',
        "  exit 2",
        "}",
    ]


def _dockerfile_commands(case: Case) -> list[str]:
    name = case.dockerfile_name
    commands = []
    if posixpath.dirname(name):
        commands.append(f'mkdir -p "$ctx"/{ansi_quote(posixpath.dirname(name))}')
    path = f'"$ctx"/{ansi_quote(name)}'
    commands.append(f"printf %s {ansi_quote(case.dockerfile_text)} > {path}")
    if case.dockerignore is not None:
        text = "".join(pattern + "\n" for pattern in case.dockerignore)
        commands.append(f'printf %s {ansi_quote(text)} > "$ctx/.dockerignore"')
    if case.dockerfile_dockerignore is not None:
        text = "".join(pattern + "\n" for pattern in case.dockerfile_dockerignore)
        specific = f'"$ctx"/{ansi_quote(name + ".dockerignore")}'
        commands.append(f"printf %s {ansi_quote(text)} > {specific}")
    return commands


def _context_commands(case: Case) -> list[str]:
    commands = []
    for entry in case.files:
        parent = posixpath.dirname(entry.path)
        if parent:
            commands.append(_make_parents(parent))
        commands.append(_at(entry.path, partial(_create, entry)))
        for name, value in entry.xattrs:
            commands.append(_at(entry.path, partial(_setfattr, name, value)))
    if case.bulk is not None:
        commands += _bulk_commands(case.bulk)
    for entry in sorted(case.files, key=lambda e: e.path.count("/"), reverse=True):
        if entry.kind in (FileKind.HARDLINK, FileKind.SOCKET):
            continue
        commands.append(_at(entry.path, partial(_attributes, entry)))
    return commands


def _setfattr(name: str, value: str, path: str) -> str:
    # setfattr reads a value starting with 0x or 0s as hex or base64, so the
    # value always goes as hex. An empty value is an empty word.
    encoded = value.encode("utf-8", "surrogateescape").hex()
    value_word = f"0x{encoded}" if encoded else "''"
    return f"setfattr -h -n {ansi_quote(name)} -v {value_word} {path}"


def _attributes(entry: ContextFile, path: str) -> str:
    commands = [f"chown -h {entry.uid}:{entry.gid} {path}"]
    if entry.kind is not FileKind.SYMLINK:
        commands.append(f"chmod {stat.S_IMODE(entry.mode):04o} {path}")
    commands.append(f"touch -h -d @{_seconds(entry.mtime_ns)} {path}")
    return " && ".join(commands)


def _at(path: str, command: Callable[[str], str]) -> str:
    """Return ``command`` applied to ``path`` in the context.

    A long path is reached by changing into one directory at a time in a
    subshell, so that no single file name given to a tool passes PATH_MAX.
    """
    if len(os.fsencode(path)) <= LONG_PATH_BYTES:
        return command(f'"$ctx"/{ansi_quote(path)}')
    parent, leaf = posixpath.split(path)
    steps = ['cd -P "$ctx"']
    steps += [f"cd -P {ansi_quote(part)}" for part in parent.split("/")]
    return "(" + " && ".join([*steps, command(ansi_quote(leaf))]) + ")"


def _make_parents(parent: str) -> str:
    if len(os.fsencode(parent)) <= LONG_PATH_BYTES:
        return f'mkdir -p "$ctx"/{ansi_quote(parent)}'
    steps = ['cd -P "$ctx"']
    for part in parent.split("/"):
        quoted = ansi_quote(part)
        steps.append(f"mkdir -p {quoted} && cd -P {quoted}")
    return "(" + " && ".join(steps) + ")"


def _bulk_commands(recipe: BulkRecipe) -> list[str]:
    block = _octal(content_block(recipe.seed))
    content = '"$work/bulk-content"'
    return [
        f"# The bulk recipe: {recipe.count} files under bulk/, each a prefix of",
        "# one content file; see buildfuzz/bulk.py for the same loop in Python.",
        f"fill {content} {max(recipe.sizes)} '{block}'",
        *bulk_shell_commands(recipe, content, f"@{_seconds(BULK_MTIME_NS)}"),
    ]


def _octal(data: bytes) -> str:
    return "".join(f"\\{byte:03o}" for byte in data)


def _seconds(mtime_ns: int) -> str:
    """Format nanoseconds as seconds for ``touch -d @``, negative ones too."""
    sign = "-" if mtime_ns < 0 else ""
    seconds, nanoseconds = divmod(abs(mtime_ns), 1_000_000_000)
    return f"{sign}{seconds}.{nanoseconds:09d}"


def _create(entry: ContextFile, path: str) -> str:
    kind = entry.kind
    if kind is FileKind.FILE:
        return f"fill {path} {entry.size} '{_octal(content_block(entry.seed))}'"
    if kind is FileKind.SPARSE:
        return f": > {path} && truncate -s {entry.size} {path}"
    if kind is FileKind.ARCHIVE:
        encoded = base64.b64encode(archive_content(entry.seed, entry.size)).decode()
        return f"echo {encoded} | base64 -d > {path}"
    if kind is FileKind.DIR:
        return f"mkdir -p {path}"
    if kind is FileKind.SYMLINK:
        return f"ln -s {ansi_quote(entry.target)} {path}"
    if kind is FileKind.HARDLINK:
        return f'ln "$ctx"/{ansi_quote(entry.target)} {path}'
    if kind is FileKind.CHAR_DEVICE:
        return f"mknod -m 0600 {path} c {entry.major} {entry.minor}"
    if kind is FileKind.BLOCK_DEVICE:
        return f"mknod -m 0600 {path} b {entry.major} {entry.minor}"
    if kind is FileKind.SOCKET:
        return (
            f"echo {shlex.quote('repro.sh: not creating socket ' + repr(entry.path))}"
            " >&2  # no common shell tool leaves a unix socket node behind"
        )
    return f"mkfifo {path}"


def _busybox_import() -> list[str]:
    return [
        f"sed -n '/^{PAYLOAD_MARKER}$/,$p' \"$0\" | tail -n +2 | base64 -d "
        '> "$work/busybox.tar"',
        "docker import --change 'ENV PATH=/bin' --change 'CMD [\"/bin/sh\"]' "
        f'"$work/busybox.tar" {BUSYBOX_IMAGE} >/dev/null || exit 2',
    ]


def _busybox_payload() -> str:
    from buildfuzz.install import busybox_binary

    with tempfile.TemporaryDirectory() as directory:
        tar_path = busybox_rootfs_tar(Path(busybox_binary()), Path(directory) / "r.tar")
        encoded = base64.encodebytes(tar_path.read_bytes()).decode()
    return f"exit 2\n{PAYLOAD_MARKER}\n{encoded}"


def _registry_base_commands(case: Case, bases: list[BaseFormat]) -> list[str]:
    """Build each registry base again and push it to $BASE_REGISTRY.

    The bases are rebuilt like buildfuzz built them (BuildKit, ``FROM
    scratch`` plus each platform's busybox tar), on a docker-container builder
    of BUILDKIT_BASE_IMAGE. Builders that read the engine's image store get
    the image pulled and tagged with the Dockerfile's name.
    """
    from buildfuzz.buildkit_images import newest_release
    from buildfuzz.definitions import load_definitions

    definition = load_definitions().builders[case.builder]
    engine_store = definition.classic or definition.driver == "docker"
    buildkit_image = f"moby/buildkit:{newest_release()}"
    names = ", ".join(base.image for base in bases)
    lines = [
        "",
        f"# The case builds FROM registry bases that buildfuzz made: {names}.",
        *_registry_check(
            "the script builds the base images again and pushes them there"
        ),
    ]
    if any(base.authenticated for base in bases):
        lines.append(
            "echo 'note: buildfuzz kept this base on a registry that requires "
            "login; log in to $BASE_REGISTRY with docker login to test that' >&2"
        )
    lines += [
        'base_dir="$work/base"',
        'mkdir "$base_dir"',
        f"sed -n '/^{BASE_PAYLOAD_MARKER}$/,/^{BASE_PAYLOAD_END}$/p' \"$0\" "
        "| sed '1d;$d' | base64 -d | tar -xz -C \"$base_dir\" || exit 2",
        'base_builder="buildfuzz-base-$$"',
        'docker buildx create --name "$base_builder" --driver docker-container '
        f'--driver-opt "image=${{BUILDKIT_BASE_IMAGE:-{buildkit_image}}}'
        ',network=host" --bootstrap >/dev/null || exit 2',
    ]
    for base in bases:
        reference = f"$BASE_REGISTRY/{base.repository}:{TAG}"
        flags = " ".join(shlex.quote(flag) for flag in base.build_flags())
        lines.append(
            f'docker buildx build --builder "$base_builder" --progress plain {flags} '
            f'--output "{base.output(reference)}" "$base_dir" > "$work/base.log" '
            '2>&1 || { cat "$work/base.log"; docker buildx rm "$base_builder"; '
            "exit 2; }"
        )
        if engine_store:
            platform = case.platform if base.multi_platform and case.platform else ""
            option = f"--platform {shlex.quote(platform)} " if platform else ""
            lines += [
                f'docker pull --quiet {option}"{reference}" >/dev/null || exit 2',
                f'docker tag "{reference}" {shlex.quote(base.image)} || exit 2',
            ]
    lines.append('docker buildx rm "$base_builder" >/dev/null 2>&1')
    return lines


def _registry_check(why: str) -> list[str]:
    return [
        'if [ -z "${BASE_REGISTRY:-}" ]; then',
        "  echo 'repro.sh: set BASE_REGISTRY to a registry on this machine that",
        "docker pushes to and pulls from over plain HTTP (for example",
        f"localhost:5000); {why}' >&2",
        "  exit 2",
        "fi",
    ]


def _sbom_check(case: Case) -> list[str]:
    """Require the SBOM generator image that the case's --sbom flag names."""
    if not needs_scanner(case.attest):
        return []
    return [
        "",
        f'if [ -z "${{{SBOM_VARIABLE}:-}}" ]; then',
        f"  echo 'repro.sh: set {SBOM_VARIABLE} to an SBOM generator image that",
        "the builder can pull, such as docker/buildkit-syft-scanner (buildfuzz",
        f"used one around {SCANNER_MODULE} {SCANNER_VERSION}); the case makes an",
        "SBOM attestation' >&2",
        "  exit 2",
        "fi",
    ]


def _base_payload(bases: list[BaseFormat]) -> str:
    platforms = tuple(sorted({p for base in bases for p in base.platforms}))
    with tempfile.TemporaryDirectory() as directory:
        names = tuple(base.name for base in bases)
        context = write_base_context(Path(directory) / "base", platforms, names)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for path in sorted(context.iterdir()):
                archive.add(path, arcname=path.name)
    encoded = base64.encodebytes(buffer.getvalue()).decode()
    return f"exit 2\n{BASE_PAYLOAD_MARKER}\n{encoded}{BASE_PAYLOAD_END}\n"


def build_command(case: Case, *, classic: bool) -> list[str]:
    """Return the docker command line of ``case``, as a list of words.

    It matches what ``build.CaseRunner`` asks python-on-whales to run.
    """
    if classic:
        command = ["docker", "build", "--tag", "$image"]
    else:
        command = ["docker", "buildx", "build", "--progress", "plain"]
        command += ["--network", "none"]
        if case.output is Output.LOAD:
            command += ["--load", "--tag", "$image"]
        elif case.output is Output.TAR:
            command += ["--output", "type=tar,dest=$work/rootfs.tar"]
        elif case.output is Output.LOCAL:
            command += ["--output", "type=local,dest=$work/rootfs"]
        elif case.output is Output.OCI:
            command += ["--output", "type=oci,dest=$work/image-oci.tar"]
        elif case.output is Output.DOCKER_TAR:
            command += ["--output", "type=docker,dest=$work/image.tar,name=$image"]
        elif case.output is Output.PUSH:
            reference = f"$BASE_REGISTRY/{PUSH_REPOSITORY}:repro"
            output = push_output(case, reference)
            command += ["--output", ",".join(f"{k}={v}" for k, v in output.items())]
    if case.platform:
        command += ["--platform", case.platform]
    for name, value in case.build_args:
        if secrets.is_reference(value):
            # _secret_commands exports NAME, which docker reads for a bare NAME.
            command += ["--build-arg", name]
        else:
            command += ["--build-arg", f"{name}={value}"]
    options = case.option_arguments("$ctx", sbom_generator=f"${SBOM_VARIABLE}")
    return [*command, *options, case.context_argument("$ctx")]


def _secret_commands(case: Case) -> list[str]:
    """Set the secret build arguments and build secrets that the build reads.

    buildfuzz read a secret build argument ``env:VAR`` from VAR and made up
    the build secrets' values; the script reads the same variables (VAR, and
    BUILDFUZZ_SECRET_<id> for a build secret) and uses a placeholder for
    each one that is not set. No value is written into the script.
    """
    lines = []
    for name, value in case.build_args:
        if secrets.is_reference(value):
            variable = value.removeprefix(secrets.ENV_PREFIX)
            lines.append(f'export {name}="${{{variable}:-{PLACEHOLDER_SECRET}}}"')
    for secret_id, source in case.build_secrets:
        variable = secrets.secret_variable(secret_id)
        lines.append(f'export {variable}="${{{variable}:-{PLACEHOLDER_SECRET}}}"')
        if source == "file":
            path = secrets.secret_file("$ctx", secret_id)
            lines.append('mkdir -p "$ctx.secrets" && chmod 700 "$ctx.secrets"')
            lines.append(f'printf %s "${variable}" > "{path}"')
    if lines:
        lines.insert(0, "# Secrets: set these variables to use values of your own.")
        lines.insert(0, "")
    return lines


def _churn_commands(case: Case) -> list[str]:
    """Return the lines that change a context file while the build runs."""
    target = churn_target(case.files) if case.churn else None
    if target is None:
        return []
    path = f'"$ctx"/{ansi_quote(target)}'
    if case.churn == "append":
        change = f"head -c 4098 /dev/zero >> {path}"
    else:
        # Empty the file and fill it again a block at a time.
        change = (
            f"size=$(stat -c %s {path}); : > {path}; "
            'for _ in $(seq 0 4098 "$size"); do '
            f"head -c 4098 /dev/zero >> {path}; done"
        )
    return [
        f"# The case changes {target} ({case.churn}) while the client sends it.",
        f"( while :; do {change}; sleep 0.005; done ) &",
        "churn=$!",
    ]


def _client_user_commands(user: str, *, classic: bool) -> list[str]:
    """Return the lines that let ``user`` run the client, as the case's did.

    They exit 2 when the user cannot run the client against the daemon, so
    that a set-up problem is not reported as a failure that did not reproduce.
    """
    quoted = shlex.quote(user)
    client = (
        f'setpriv --reuid={quoted} --regid={quoted} --init-groups env HOME="$work/home"'
    )
    check = "docker version" if classic else "docker version && docker buildx version"
    check = check.replace("docker ", f"{client} docker ")
    return [
        f"# The case's client runs as user {user}, not root. The user must exist",
        "# and may use the daemon (as a member of the docker group may).",
        f"if ! id -u {quoted} >/dev/null 2>&1; then",
        f'  echo "repro.sh: user {user} not found; create it, for example with" \\',
        f'    "useradd --system {user}, and let it use the daemon" >&2',
        "  exit 2",
        "fi",
        'mkdir -p "$work/home" && chmod 711 "$work"',
        f'chown {quoted} "$work" "$work/home"',
        f'if ! {{ {check}; }} >"$work/client.log" 2>&1; then',
        '  cat "$work/client.log" >&2',
        f'  echo "repro.sh: user {user} cannot run docker here; it needs docker on" \\',
        '    "PATH, the daemon socket and DOCKER_CONFIG open to it (the exports of" \\',
        '    "buildfuzz sandbox give that)" >&2',
        "  exit 2",
        "fi",
    ]


def _build_commands(case: Case, timeout: float) -> list[str]:
    from buildfuzz.definitions import load_definitions

    definition = load_definitions().builders[case.builder]
    classic = definition.classic
    words = [_shell_word(word) for word in build_command(case, classic=classic)]
    prefix = "DOCKER_BUILDKIT=0 " if classic else ""
    lines = _builder_commands(definition, case)
    if lines:
        words.insert(3, '--builder "$builder"')
    build = f"{prefix}timeout {int(timeout)} {' '.join(words)}"
    if case.client_user:
        lines += _client_user_commands(case.client_user, classic=classic)
        build = (
            f"setpriv --reuid={case.client_user} --regid={case.client_user} "
            f'--init-groups env HOME="$work/home" {build}'
        )
    if case.context_from == "stdin-tar":
        tar = " ".join(_shell_word(word) for word in tar_command(Path("$ctx")))
        build = f'{tar} 2> "$work/tar.log" | {build}'
    elif case.context_from == "stdin-dockerfile":
        build += f' < "$ctx"/{ansi_quote(case.dockerfile_name)}'
    churn = _churn_commands(case)
    lines += [
        *churn,
        f'{build} > "$work/build.log" 2>&1',
        "status=$?",
        *(['kill "$churn" 2>/dev/null; wait "$churn" 2>/dev/null'] if churn else []),
        'cat "$work/build.log"',
    ]
    if case.output is Output.DOCKER_TAR:
        lines += [
            'if [ "$status" -eq 0 ]; then',
            '  docker load -i "$work/image.tar" > "$work/build.log" 2>&1; status=$?',
            '  cat "$work/build.log"',
            "fi",
        ]
    return lines


def _builder_commands(definition: "BuilderDefinition", case: Case) -> list[str]:
    """Create the case's buildx builder for the docker-container or remote driver.

    buildfuzz ran these builders with BuildKit images it built itself; here the
    docker-container driver uses BUILDKIT_IMAGE (moby/buildkit of the same
    version by default) and the remote driver the buildkitd at BUILDKIT_HOST.
    """
    if definition.driver not in ("docker-container", "remote"):
        return []
    lines = ['builder="buildfuzz-repro-$$"']
    config = ""
    if formats_in(case.dockerfile):
        # BuildKit fetches "localhost/..." images from $BASE_REGISTRY.
        section = "  http = true\\n  insecure = true\\n"
        lines.append(
            'printf \'[registry."localhost"]\\n  mirrors = ["%s"]\\n'
            f'{section}[registry."%s"]\\n{section}\' '
            '"$BASE_REGISTRY" "$BASE_REGISTRY" > "$work/buildkitd.toml"'
        )
        config = '--config "$work/buildkitd.toml" '
    if definition.driver == "docker-container":
        image = f"moby/buildkit:{definition.buildkit}"
        lines.append(
            f'docker buildx create --name "$builder" --driver docker-container '
            f'--driver-opt "image=${{BUILDKIT_IMAGE:-{image}}},network=host" '
            f"{config}--bootstrap >/dev/null || exit 2"
        )
    else:
        lines.append(
            'docker buildx create --name "$builder" --driver remote '
            '"${BUILDKIT_HOST:?set BUILDKIT_HOST to the address of a buildkitd}" '
            "--bootstrap >/dev/null || exit 2"
        )
        if config:
            # A remote buildkitd reads its own configuration file.
            lines.append(
                "echo 'note: the buildkitd at BUILDKIT_HOST needs the registry "
                'mirror of "localhost" that $work/buildkitd.toml shows\' >&2'
            )
    lines.append("trap 'docker buildx rm \"$builder\" >/dev/null 2>&1; cleanup' EXIT")
    if any(BUSYBOX_IMAGE in line for line in case.dockerfile):
        lines.append(
            "echo 'note: this builder pulls the busybox base from a registry; "
            "push the imported localhost/buildfuzz/busybox:1 to one it can reach "
            'and point its registry mirror for "localhost" there\' >&2'
        )
    return lines


def _shell_word(word: str) -> str:
    if "$" in word:
        return '"' + word + '"'  # one of the script's own variables
    return shlex.quote(word)


def _verdict(signature: Signature) -> list[str]:
    if signature.phase is Phase.RESULT:
        # An oracle judged the output of a build that passed; docker alone
        # cannot tell, so a passing build is neither verdict.
        return [
            'if [ "$status" -eq 0 ]; then',
            '  echo "buildfuzz repro: cannot tell: the build passed, and the finding"'
            " \\",
            '    "is about its result, which only buildfuzz replay checks" >&2',
            "  exit 2",
            "fi",
            'echo "buildfuzz repro: did not reproduce (exit status $status)"',
            "exit 1",
        ]
    if signature.phase is Phase.HANG:
        check = '[ "$status" -eq 124 ]'
    else:
        pattern = shlex.quote(signature_pattern(signature))
        check = f'[ "$status" -ne 0 ] && grep -Eq -- {pattern} "$work/build.log"'
    return [
        f"if {check}; then",
        '  echo "buildfuzz repro: REPRODUCED"',
        "  exit 0",
        "fi",
        'echo "buildfuzz repro: did not reproduce (exit status $status)"',
        "exit 1",
    ]
