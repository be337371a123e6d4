"""docs/configuration.md, generated from the config dataclasses so that it cannot drift.

    make docs                                   # = python -m tasks.config_reference
    python -m tasks.config_reference --check    # exit 1 when the page differs from the code

Every key of ExperimentConfig (tasks/schema.py) and the sections it composes, with its type, its
default and its meaning. The meaning is the field's own comment in the source: the comment lines
directly above the field plus its trailing `# comment` (a block above also covers the
uncommented fields right after it that it names). Then the model presets
(imf_core.models.PRESETS) and what each experiment file changes. tests/test_docs.py regenerates
the page and compares it with the file byte for byte.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

from imf_core.models import PRESETS
from imf_core.models.config import ModelConfig
from tasks.config import CONFIG_DIR, load_config
from tasks.schema import ExperimentConfig

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
ROOT = PAGE.parent.parent


# ------------------------------------------------------------------ comments from the source
def _comment_text(token: str) -> str:
    text = token.lstrip("#").strip()
    return "" if text.startswith(("noqa", "type:", "fmt:")) else text


def field_comments(cls: type) -> dict[str, str]:
    """Each field's meaning, read from the class's source: the comment lines directly above it
    and the comments on its own lines. A block above a field also covers the uncommented fields
    right after it (no blank line between) that it names (`gpus_per_worker` and
    `cpus_per_worker`); any other field without a comment of its own has none ("")."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], []).append(_comment_text(tok.string))
    meanings: dict[str, str] = {}
    block, previous_end = "", -1
    for stmt in ast.parse(source).body[0].body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            block, previous_end = "", -1
            continue
        name = stmt.target.id
        above: list[str] = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, _comment_text(lines[line - 1].strip()))
            line -= 1
        own = [c for n in range(stmt.lineno, stmt.end_lineno + 1) for c in comments.get(n, [])]
        text = " ".join(t for t in above + own if t)
        if above:
            block = " ".join(above)
        elif text or stmt.lineno != previous_end + 1:
            block = ""
        elif block and name in block:
            text = block
        meanings[name] = text
        previous_end = stmt.end_lineno
    return meanings


def comment_above(module, name: str) -> str:
    """The comment block right above the module-level assignment of `name`."""
    lines = inspect.getsource(module).splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{name} ="):
            block = []
            while i > 0 and lines[i - 1].startswith("#"):
                block.insert(0, _comment_text(lines[i - 1]))
                i -= 1
            return " ".join(block)
    return ""


# ------------------------------------------------------------------ rendering
def type_name(kind) -> str:
    if isinstance(kind, type) and not typing.get_args(kind):
        return kind.__name__
    return str(kind).replace("typing.", "")


def show(value) -> str:
    """A value as one writes it on the command line (key=value)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, list | dict):
        text = json.dumps(value)
    else:
        text = repr(value)
    return f"`{text}`"


def cell(text: str) -> str:
    """Markdown table cell: pipes escaped, and < > outside code spans (else HTML tags)."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts) or "—"


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def where(cls: type) -> str:
    path = Path(inspect.getsourcefile(cls)).resolve().relative_to(ROOT)
    return f"`{cls.__name__}` in [`{path}`](../{path})"


def section_table(prefix: str, cls: type) -> list[str]:
    """One row per field: key, type, default, meaning (the field's comments)."""
    meanings = field_comments(cls)
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        kind, default = cell(type_name(hints[f.name])), cell(show(default_of(f)))
        rows.append(f"| `{prefix}{f.name}` | {kind} | {default} | {cell(meanings[f.name])} |")
    return rows


def model_section(section_cls: type) -> list[str]:
    import tasks.schema

    name_default = next(f.default for f in dataclasses.fields(section_cls) if f.name == "name")
    what = cell(comment_above(tasks.schema, "ModelSection")).rstrip(".")
    out = [
        f"{what}. The section is `ModelSection` in "
        "[`tasks/schema.py`](../tasks/schema.py), built from "
        f"{where(ModelConfig)}: `model.name` picks a preset (below); every other `model.*` key "
        "overrides that preset's value, so the defaults shown are `ModelConfig`'s, which a "
        "preset replaces.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        f"| `model.name` | str | {show(name_default)} | a preset: "
        f"{', '.join(f'`{p}`' for p in PRESETS)} |",
    ]
    out += section_table("model.", ModelConfig)[2:]
    base = dataclasses.asdict(ModelConfig())
    out += [
        "",
        "### Model presets",
        "",
        "`imf_core.models.PRESETS`, each as its difference from `ModelConfig`'s defaults:",
        "",
        "| preset | sets |",
        "|---|---|",
    ]
    for name, preset in PRESETS.items():
        changed = {k: v for k, v in dataclasses.asdict(preset).items() if base[k] != v}
        sets = ", ".join(f"{k}={show(v).strip('`')}" for k, v in changed.items())
        out.append(f"| `{name}` | {cell(f'`{sets}`' if sets else '')} |")
    return out


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "tags" else {prefix + k: v}
    return out


def experiment_values() -> list[str]:
    """What each configs/experiment/*.yaml, composed with base.yaml and its data file, sets to
    something other than the schema's default."""
    defaults = flat(dataclasses.asdict(ExperimentConfig()))
    names = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    values = {n: flat(dataclasses.asdict(load_config(n))) for n in names}
    keys = [k for k in defaults if k != "name" and any(values[n][k] != defaults[k] for n in names)]
    out = [
        "| key | default | " + " | ".join(f"`-e {n}`" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for k in keys:
        default = "(preset)" if defaults[k] is None else show(defaults[k])
        row = [show(values[n][k]) if values[n][k] != defaults[k] else "" for n in names]
        out.append(
            f"| `{k}` | {cell(default)} | " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
        )
    return out


def render() -> str:
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    top = field_comments(ExperimentConfig)
    out = [
        "<!-- Generated by `make docs` (python -m tasks.config_reference) from the config",
        "dataclasses. Do not edit: change the field's comment in the code, then `make docs`;",
        "tests/test_docs.py fails while this page and the code disagree. -->",
        "",
        "# Configuration",
        "",
        "```",
        "imf run -e smoke train.steps=100 eval.omegas=[1.0,2.0] model.name=tiny",
        "imf train -e demo optim.lr=0.001 train.batch_size=32",
        "make docs                  # rewrites this page from the code",
        "```",
        "",
        "Every experiment config is composed from `configs/base.yaml` ← `configs/data/<data>.yaml`"
        " (picked by `defaults.data`) ← `configs/experiment/<name>.yaml` (`-e <name>`) ← the "
        "command line's `key=value` overrides (no spaces around `=`; lists in brackets). Each "
        "section below is a dataclass next to the code that uses it; a key that is not here, or "
        "a value of the wrong type or out of range, is refused before anything starts (one line "
        "naming the key, exit 2). A default is the dataclass's; [the last table]"
        "(#what-each-experiment-sets) shows what each experiment changes. The meanings are the "
        "fields' comments in the code; a — is a field without one yet.",
        "",
        "Sections: "
        + ", ".join(
            f"[`{n}`](#{n})"
            for n, f in fields.items()
            if f.default_factory is not dataclasses.MISSING
        )
        + "; [model presets](#model-presets); "
        "[what each experiment sets](#what-each-experiment-sets).",
        "",
        "## Top level",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, f in fields.items():
        if f.default_factory is dataclasses.MISSING:
            meaning = top.get(name) or "the experiment's name (`-e`), set by `load_config`"
            out.append(f"| `{name}` | str | {show(default_of(f))} | {cell(meaning)} |")
    for name, f in fields.items():
        if f.default_factory is dataclasses.MISSING:
            continue
        cls = f.default_factory
        out += ["", f"## {name}", ""]
        if name == "model":
            out += model_section(cls)
            continue
        out += [f"{where(cls)}.", ""]
        out += section_table(f"{name}.", cls)
    out += [
        "",
        "## What each experiment sets",
        "",
        "The keys an experiment (with `configs/base.yaml` and its data file) sets to something "
        "other than the default above; an empty cell keeps the default. The model section is "
        "resolved to its preset's values.",
        "",
        *experiment_values(),
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if PAGE.is_file() and PAGE.read_text() == text:
            return 0
        print(f"{PAGE} differs from the config dataclasses: run `make docs`", file=sys.stderr)
        return 1
    PAGE.write_text(text)
    print(PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
