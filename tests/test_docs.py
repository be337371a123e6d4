"""Docs that cannot drift from the code (README.md, docs/*.md and infra/**/README.md; issue 27).

1. Commands. Every command line in a fenced code block and every inline code span that starts
   with `imf ` (also `.venv/bin/imf`, `python -m flows.demo`, after any `VAR=value` prefix; the
   `imf` after `kubectl exec ... --`, the arguments of `sbatch ... infra/slurm/imf.sbatch`) is
   checked as the CLI would check it, with nothing started: the real parser (`imf COMMAND`,
   its options), then the validation each command runs before any stage -- the experiment, every
   `key=value` (`tasks.config.load_config`: an unknown key, a bad value or model preset fails),
   the sweep, its scale, `--only` and `--seeds` (`flows.sweep_config.load_sweep`, `variant_configs`,
   as `imf sweep --plan` does), `--gpu` (a GPU check of it exists), the report's target. What
   depends on the machine is not checked: files named by values (`eval.checkpoint=...`) and
   servers. `make TARGET` lines must name a Makefile target.
   Placeholders: a line is a synopsis, not a command, and is skipped when it contains `…` or
   `...`, a `<placeholder>`, a `|` between alternatives, an optional `[-...]` part, or an
   ALL-CAPS word as an argument or a value (EXPERIMENT, SWEEP, FILE, N). Write runnable
   examples without them; they are then checked. A span of just `imf` or `imf COMMAND` names
   the program or the command: only the command's existence is checked.
2. Links. Every relative markdown link and `<img src>` resolves to a file, and an `#anchor`
   into a markdown file names one of its headings (GitHub's slugs).
3. docs/configuration.md is what `tasks.config_reference` generates (`make docs`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGES += sorted((ROOT / "infra").rglob("README.md"))  # the cluster files' own commands

FENCE = re.compile(r"^\s*```")
SPAN = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"…|\.\.\.|<[^>]*>|\||\[-|(^|\s|=)[A-Z][A-Z0-9_]*(\s|$|,)")
RUN_ID = re.compile(r"[0-9a-f]{32}")


# ------------------------------------------------------------------ finding the commands
def fenced_and_prose(text: str) -> tuple[list[str], list[str]]:
    """The lines inside fenced code blocks (backslash continuations joined) and the prose
    paragraphs outside them."""
    code, prose, paragraph, inside, pending = [], [], [], False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if inside:
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            code.append(pending)
            pending = ""
        elif line.strip():
            paragraph.append(line.strip())
        else:
            prose.append(" ".join(paragraph))
            paragraph = []
    prose.append(" ".join(paragraph))
    return code, [p for p in prose if p]


def commands_in(text: str) -> list[str]:
    """Candidate command lines: each code line, and each inline code span of the prose."""
    code, prose = fenced_and_prose(text)
    spans = [m.group(1).strip() for p in prose for m in SPAN.finditer(p)]
    return [c.strip() for c in code] + spans


def without_comment(line: str) -> str:
    line = re.sub(r"(^|\s)#.*$", "", line).strip()
    return line[2:] if line.startswith("$ ") else line


def argv_of(line: str) -> list[str] | None:
    """The words of an `imf`, `python -m flows.demo` or `make` command (with its program as
    the first word: imf, flows.demo or make), else None."""
    line = without_comment(line)
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]  # PREFECT_API_URL=... imf ...
    if not words:
        return None
    if words[0] == "kubectl" and "--" in words:  # kubectl exec ... -- imf ...
        words = words[words.index("--") + 1 :]
    script = next((w for w in words if w.endswith("infra/slurm/imf.sbatch")), None)
    if words and words[0] == "sbatch" and script:  # its arguments are an imf command's
        words = ["imf", *words[words.index(script) + 1 :]]
    if not words:
        return None
    if words[0] == "imf" or words[0].endswith("/imf"):
        return ["imf", *words[1:]]
    if re.fullmatch(r"(\S*/)?python3?", words[0]) and words[1:3] == ["-m", "flows.demo"]:
        return ["flows.demo", *words[3:]]
    if words[0] == "make":
        return words
    return None


def is_synopsis(line: str) -> bool:
    return bool(PLACEHOLDER.search(without_comment(line)))


def doc_commands() -> tuple[list[tuple[str, str, list[str]]], list[str]]:
    """(page, line, argv) of every command in the docs, and the synopsis lines skipped."""
    found, skipped = [], []
    for page in PAGES:
        for line in commands_in(page.read_text()):
            argv = argv_of(line)
            if argv is None:
                continue
            if is_synopsis(line):
                skipped.append(line)
            else:
                found.append((page.relative_to(ROOT).as_posix(), line, argv))
    return found, skipped


# ------------------------------------------------------------------ checking one command
@functools.cache
def cli_parser() -> argparse.ArgumentParser:
    from flows.cli_parser import build_parser

    return build_parser()  # ~0.2 s: it reads every sweep file for its --help


def parse_imf(words: list[str]) -> argparse.Namespace:
    """The real parser, with main()'s handling of overrides after options (flows/cli.py)."""
    parser = cli_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = parser.parse_known_args(words)
            if extra:
                if not hasattr(args, "overrides") or any(
                    e.startswith("-") or "=" not in e for e in extra
                ):
                    parser.error(f"unrecognized arguments: {' '.join(extra)}")
                args.overrides += extra
    except SystemExit as stop:
        if stop.code == 0:  # --help
            return argparse.Namespace(command="help")
        raise ValueError(err.getvalue().strip().splitlines()[-1]) from None
    return args


def check_imf(words: list[str]) -> None:
    """What the command validates before it starts anything; raises with the CLI's message."""
    from flows.cli import COMMANDS
    from flows.cli_parser import configs_in
    from flows.gpu_rates import Rates
    from flows.sweep_config import load_sweep, variant_configs
    from tasks.config import load_config

    if not words or (len(words) == 1 and words[0] in COMMANDS):
        return  # `imf` or `imf report` in prose names the program or the command
    args = parse_imf(words)
    if args.command == "help":
        return
    if args.command in ("precompute", "train", "evaluate", "run"):
        load_config(args.experiment, args.overrides)
    elif args.command == "sweep":
        only = [v for v in args.only.split(",") if v]
        variant_configs(load_sweep(args.sweep), args.scale, args.overrides, only, args.seeds)
    elif args.command == "report":
        load_config("smoke", args.overrides)  # what `imf report` reads: tracking.*, paths.*
        if args.target in configs_in("sweep"):
            scales = load_sweep(args.target).scales
            if args.scale is not None and args.scale not in scales:
                raise ValueError(f"sweep {args.target!r} has no scale {args.scale!r}")
        elif not RUN_ID.fullmatch(args.target):
            raise ValueError(f"{args.target!r} is neither a sweep nor an MLflow run id")
    if getattr(args, "gpu", ""):
        Rates.of(args.gpu, getattr(args, "mfu", 0.0))


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*):", text, re.M)}


def check(argv: list[str]) -> None:
    if argv[0] == "imf":
        check_imf(argv[1:])
    elif argv[0] == "flows.demo":
        from flows.demo import parse_args
        from tasks.config import load_config

        load_config("demo", parse_args(argv[1:])[0])  # overrides of `demo`, and --record
    elif argv[0] == "make":
        unknown = [t for t in argv[1:] if "=" not in t and t not in make_targets()]
        if unknown:
            raise ValueError(f"no Makefile target {unknown}")


def failures(commands) -> list[str]:
    bad, verdicts = [], {}
    for page, line, argv in commands:
        if tuple(argv) not in verdicts:  # the same command on several pages: checked once
            try:
                check(argv)
                verdicts[tuple(argv)] = None
            except Exception as err:  # every refusal the CLI would print, with its message
                verdicts[tuple(argv)] = f"{type(err).__name__}: {err}"
        if verdicts[tuple(argv)]:
            bad.append(f"{page}: `{line}`: {verdicts[tuple(argv)]}")
    return bad


def test_every_command_in_the_docs_is_accepted_by_the_cli():
    commands, skipped = doc_commands()
    imf = [c for c in commands if c[2][0] == "imf"]
    assert len(imf) >= 20, f"only {len(imf)} imf commands found: is the extraction broken?"
    assert {c[2][1] for c in imf if len(c[2]) > 1} >= {
        "precompute",
        "train",
        "evaluate",
        "run",
        "sweep",
        "report",
    }
    bad = failures(commands)
    assert not bad, "commands in the docs that the CLI refuses:\n" + "\n".join(bad)


BROKEN = [  # (a broken line, what the refusal must say)
    ("imf run -e smoke model.name=tny", "unknown model preset 'tny'"),
    ("imf train -e smoke train.stepz=100", "unknown key 'train.stepz'"),
    ("imf train -e smoke train.steps=abc", "bad value 'abc'"),
    ("imf evaluate -e smoke eval.omegas=1.5", "a list is needed"),
    ("imf run -e smok", "did you mean 'smoke'"),
    ("imf run -e smoke train.steps 100", "has no value"),
    ("imf sweep table9 --scale smoke", "no sweep 'table9'"),
    ("imf sweep table1a --scale huge", "no scale 'huge'"),
    ("imf sweep table1a --scale smoke --only nope", "no variant(s) ['nope']"),
    ("imf sweep table1a --scale smoke --seeds 0", "--seeds must be >= 1"),
    ("imf sweep table1a --scale paper --plan --gpu tpu9", "no GPU check of a 'tpu9'"),
    ("imf report table1c --scale mnist", "no scale 'mnist'"),
    ("imf report nonsense", "neither a sweep nor an MLflow run id"),
    ("imf frobnicate -e smoke", "invalid choice: 'frobnicate'"),
    ("imf run -e smoke --planx", "unrecognized arguments: --planx"),
    ("python -m flows.demo guidance.mode=sometimes", "guidance.mode must be one of"),
    ("make deploy", "no Makefile target ['deploy']"),
]


@pytest.mark.parametrize("line, reason", BROKEN)
def test_the_checker_refuses_a_broken_command(line, reason):
    argv = argv_of(line)
    assert argv is not None and not is_synopsis(line)
    refused = failures([("test", line, argv)])
    assert refused and reason in refused[0], f"{line!r}: {refused}"


def test_a_broken_command_in_a_page_is_found(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```\nimf run -e smoke \\\n    model.name=tny   # a typo\n```\n\n"
        "Then `imf sweep table1a --scale smoke train.stepz=5`, and the synopsis "
        "`imf run -e EXPERIMENT [key=value ...]` is skipped.\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PAGES", [page])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    commands, skipped = doc_commands()
    assert [c[2] for c in commands] == [
        ["imf", "run", "-e", "smoke", "model.name=tny"],
        ["imf", "sweep", "table1a", "--scale", "smoke", "train.stepz=5"],
    ]
    assert skipped == ["imf run -e EXPERIMENT [key=value ...]"]
    assert len(failures(commands)) == 2


@pytest.mark.parametrize(
    "line",
    [
        "imf run -e EXPERIMENT --plan",
        "imf sweep SWEEP --scale smoke|paper",
        "imf evaluate -e imagenet_b2 eval.checkpoint=FILE",
        "imf report … --scale smoke",
        "imf sweep table1a --scale S --plan [--gpu h200 | --mfu X]",
        "imf train -e demo key=value ...",
    ],
)
def test_synopsis_lines_are_recognised(line):
    assert is_synopsis(line)


@pytest.mark.parametrize(
    "line",
    [
        "imf run -e smoke eval.omegas=[1.0,2.0]",
        "imf sweep table1a --scale paper --plan --gpu h200",
        "imf evaluate -e imagenet_b2 eval.checkpoint=iMF-B-2.pth eval.device=cuda",
    ],
)
def test_runnable_lines_are_not_taken_for_synopses(line):
    assert not is_synopsis(line)


# ------------------------------------------------------------------ links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMG = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    inside = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside and (m := re.match(r"#{1,6}\s+(.*)", line)):
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links_in(page: Path) -> list[str]:
    _, prose = fenced_and_prose(page.read_text())
    text = "\n".join(SPAN.sub("", p) for p in prose)
    return [m.group(1) for m in LINK.finditer(text)] + [m.group(1) for m in IMG.finditer(text)]


def broken_links(pages: list[Path]) -> tuple[list[str], int]:
    """Relative links and images that resolve to no file, or to no heading of a markdown
    file; and how many were checked."""
    bad, checked = [], 0
    for page in pages:
        for target in links_in(page):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            checked += 1
            if not file.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                bad.append(f"{page.name}: {target} (no such heading)")
    return bad, checked


def test_every_relative_link_and_image_resolves():
    bad, checked = broken_links(PAGES)
    assert checked >= 30, f"only {checked} links found: is the extraction broken?"
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n## Some part\n\n[ok](#some-part) [ok](page.md#a-page) "
        '<img src="img/a.png"> [gone](other.md) [typo](#some-prat) <img src="img/b.png">\n\n'
        "```\n[not a link](nowhere.md)\n```\n"
    )
    bad, checked = broken_links([page])
    assert checked == 6
    assert bad == [
        "page.md: other.md (no such file)",
        "page.md: #some-prat (no such heading)",
        "page.md: img/b.png (no such file)",
    ]


def test_slugs_follow_github():
    assert slug("What survives what") == "what-survives-what"
    assert slug("On a GPU: `make gpu-check`") == "on-a-gpu-make-gpu-check"
    assert slug("Tab. 1a, 1b and 1c (5 seeds)") == "tab-1a-1b-and-1c-5-seeds"


# ------------------------------------------------------------------ the configuration page
def test_configuration_page_is_what_the_schemas_generate():
    from tasks.config_reference import PAGE, render

    assert PAGE.read_text() == render(), (
        "docs/configuration.md differs from the config dataclasses: run `make docs`"
    )
