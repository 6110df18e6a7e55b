"""Checks of the CI examples in docs/ci against the real command line.

Every ``buildfuzz`` or ``./dev.sh`` command in the examples is extracted,
and each option it uses must appear in ``buildfuzz <subcommand> --help``,
so an example breaks here when the command line changes.
"""

import functools
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BUILDFUZZ, REPO

CI_DOCS = REPO / "docs" / "ci"
YAML_FILES = (
    "github-actions.yml",
    "github-actions-shards.yml",
    "github-actions-dind.yml",
    "gitlab-ci.yml",
)
# A command line of the examples: `buildfuzz`, a path ending in `/buildfuzz`,
# or `./dev.sh` at the start of a line, after optional `sudo`.
COMMAND = re.compile(r"^\s*(?:sudo\s+)?(?:\./dev\.sh|(?:[\w.-]*/)*buildfuzz)\s+(.*)")
# dev.sh commands that are not buildfuzz subcommands.
DEV_ONLY = {"test", "lint"}
GROUPS = {"results", "builders"}


def load_yaml(name: str) -> Any:
    return yaml.safe_load((CI_DOCS / name).read_text())


def shell_texts(value: Any) -> list[str]:
    """Return the shell scripts of a parsed CI file: `run:` and `script:` values."""
    if isinstance(value, dict):
        texts = []
        for key, item in value.items():
            if key in ("run", "script", "before_script", "after_script"):
                texts += [item] if isinstance(item, str) else list(item)
            else:
                texts += shell_texts(item)
        return texts
    if isinstance(value, list):
        return [text for item in value for text in shell_texts(item)]
    return []


def markdown_blocks(path: Path) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", path.read_text(), flags=re.DOTALL)


def example_scripts() -> dict[str, str]:
    # gitlab-ci.yml runs nightly.sh, which is checked on its own.
    scripts = {
        name: "\n".join(shell_texts(load_yaml(name)))
        for name in YAML_FILES
        if name != "gitlab-ci.yml"
    }
    scripts["nightly.sh"] = (CI_DOCS / "nightly.sh").read_text()
    scripts["docs/ci/README.md"] = "\n".join(markdown_blocks(CI_DOCS / "README.md"))
    scripts["README.md"] = "\n".join(markdown_blocks(REPO / "README.md"))
    return scripts


def commands(script: str) -> list[list[str]]:
    """Return the words after `buildfuzz` or `./dev.sh` of each command line."""
    joined = script.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        match = COMMAND.match(line)
        if match is None:
            continue
        # Cut the command off at a shell operator that ends it.
        text = re.split(r"\s(?:\|\||&&|;|\||>>?)\s", match.group(1))[0]
        found.append(shlex.split(text, comments=True))
    return found


def subcommand(words: list[str]) -> list[str]:
    if words[0] in GROUPS and len(words) > 1 and not words[1].startswith("-"):
        return words[:2]
    return words[:1]


@functools.cache
def help_text(path: tuple[str, ...]) -> str:
    completed = subprocess.run(
        [*BUILDFUZZ, *path, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert completed.returncode == 0, f"buildfuzz {' '.join(path)}: {completed}"
    return completed.stdout


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_parses(name: str) -> None:
    assert isinstance(load_yaml(name), dict)


def test_github_workflow_runs_privileged_debian() -> None:
    workflow = load_yaml("github-actions.yml")
    job = workflow["jobs"]["fuzz"]

    assert job["container"] == {"image": "debian:12", "options": "--privileged"}
    # PyYAML reads the key `on` as the boolean true (YAML 1.1).
    assert "schedule" in workflow[True]


def test_dind_workflow_fuzzes_each_service() -> None:
    job = load_yaml("github-actions-dind.yml")["jobs"]["fuzz"]
    script = "\n".join(shell_texts(job)).replace("\\\n", " ")

    assert job["services"]["docker"]["image"] == "docker:${{ matrix.engine }}-dind"
    assert job["services"]["docker"]["options"] == "--privileged"
    assert job["strategy"]["matrix"]["engine"]
    assert '--engine-host "$ENGINE_HOST" --disposable-engine' in script
    assert job["env"]["ENGINE_HOST"] == "tcp://docker:2375"


def test_sharded_workflow_merges_every_shard() -> None:
    jobs = load_yaml("github-actions-shards.yml")["jobs"]

    shards = jobs["shard"]["strategy"]["matrix"]["shard"]
    script = "\n".join(shell_texts(jobs["shard"]))
    assert f"/{len(shards)} " in script.replace("\\\n", " ")
    assert jobs["merge"]["needs"] == "shard"


def test_gitlab_job_reports_junit() -> None:
    job = load_yaml("gitlab-ci.yml")["buildfuzz-nightly"]

    assert job["artifacts"]["reports"]["junit"] == "report/junit.xml"
    assert job["rules"] == [{"if": '$CI_PIPELINE_SOURCE == "schedule"'}]
    assert job["script"] == ["bash docs/ci/nightly.sh"]


def test_nightly_script_is_valid_bash() -> None:
    path = CI_DOCS / "nightly.sh"

    completed = subprocess.run(
        ["bash", "-n", str(path)], capture_output=True, text=True, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert "set -euo pipefail" in path.read_text()
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize("name", sorted(example_scripts()))
def test_example_commands_match_the_cli(name: str) -> None:
    found = [words for words in commands(example_scripts()[name]) if words]
    assert found, f"no buildfuzz command found in {name}"

    for words in found:
        if words[0] in DEV_ONLY:
            continue
        path = subcommand(words)
        text = help_text(tuple(path))
        for word in words[len(path) :]:
            if word.startswith("--"):
                option = word.split("=", 1)[0]
                assert re.search(rf"{re.escape(option)}(?![\w-])", text), (
                    f"{name}: `buildfuzz {' '.join(path)}` has no option {option}"
                )


def test_commands_are_extracted() -> None:
    script = (
        "status=0\n"
        "./dev.sh run --ci --budget 1h \\\n  --junit r.xml || status=$?\n"
        "# buildfuzz replay --commented\n"
        'buildfuzz results merge "${inputs[@]}" --into out\n'
        "cp -r ~/.cache/buildfuzz /tmp\n"
        'echo "nightly: buildfuzz failed"\n'
        "  sudo .venv/bin/buildfuzz report --html r.html\n"
    )

    assert commands(script) == [
        ["run", "--ci", "--budget", "1h", "--junit", "r.xml"],
        ["results", "merge", "${inputs[@]}", "--into", "out"],
        ["report", "--html", "r.html"],
    ]
