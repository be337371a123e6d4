"""Numbers the docs quote from a run or from the code, checked against where they come from
(issue 36).

Each row of QUOTES names a page, the text as the page has it with `{}` where a number stands,
the source (a file a run wrote: benchmarks/gpu/*.json, benchmarks/RESULTS.md; a test's
asserted bound; the code) and one reader per `{}` that formats that number from the source.
The page must hold the text with the numbers filled in from the source (line breaks and a YAML
comment's `#` read as spaces): a page that changes a number, or a rerun that writes another,
fails here until the two agree. Numbers with no file behind them (the small-scale study's FIDs,
recorded only in the docs) are not in the table.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "benchmarks" / "gpu"
RUN1, RUN2 = "2026-12-04-h200-run1.json", "2026-12-04-h200-run2.json"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


# ------------------------------------------------------------------ the sources
@functools.cache
def gpu(name: str) -> dict:
    return json.loads((GPU / name).read_text())


def speed(name: str, model: str, objective: str, compile_: str) -> dict:
    """A GPU check's timed step (the first with that model, objective and compile mode)."""
    return next(
        e
        for e in gpu(name)["speed"]["entries"]
        if (e["model"], e["objective"], e["compile"]) == (model, objective, compile_)
    )


@functools.cache
def results(heading: str) -> dict:
    """The JSON block of a benchmarks/RESULTS.md section, by its `## ` heading."""
    text = RESULTS.read_text()
    section = text[text.index(f"## {heading}\n") :]
    return json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))


def cpu_ratio(heading: str, objective: str) -> float:
    return results(heading)[f"ratio_{objective}_to_fm"]


def results_date() -> str:
    return re.search(r"^- date: (\d{4}-\d\d-\d\d)", RESULTS.read_text(), re.M).group(1)


def asserted(test_file: str, pattern: str) -> float:
    """A bound a test asserts, read from its source."""
    return float(re.search(pattern, (ROOT / "tests" / test_file).read_text()).group(1))


@functools.cache
def b2_config():
    from tasks.config import load_config

    return load_config("imagenet_b2")


def b2_checkpoint_gb() -> float:
    from tasks.train import checkpoint_bytes

    return checkpoint_bytes(b2_config().model_config()) / 1e9


def params_m(name: str, inference: bool) -> float:
    from imf_core.models import count_params, create

    return count_params(create(name, device="meta"), inference=inference) / 1e6


def adam_gib(name: str) -> float:
    """AdamW's two float32 moments of a preset with its aux head, as flows.gpu_memory adds them."""
    return 8 * params_m(name, inference=False) * 1e6 / 2**30


def timed_oom(name: str, model: str, objective: str) -> str:
    """The batch of a GPU check's eager timed step that ran out of memory."""
    entry = speed(name, model, objective, "none")
    assert entry.get("error") == "out of memory", entry
    return str(entry["batch"])


def restated_mfu(name: str, model: str, objective: str, compile_: str) -> float:
    from flows.gpu_rates import restated_mfu as restate

    return restate(name, gpu(name), speed(name, model, objective, compile_))


def useful_gflop(name: str, model: str, objective: str, compile_: str) -> float:
    """A recorded step's useful GFLOP per image, as --plan restates it."""
    from flows.gpu_rates import useful_flops_per_image

    return useful_flops_per_image(name, gpu(name), speed(name, model, objective, compile_)) / 1e9


def useful_tflops(name: str, model: str, objective: str, compile_: str) -> float:
    entry = speed(name, model, objective, compile_)
    return entry["images_per_s"] * useful_gflop(name, model, objective, compile_) / 1e3


def zero_gemm_gflop(model: str, objective: str) -> float:
    from flows.gpu_rates import recorded_zero_gemms

    return recorded_zero_gemms(model, objective) / 1e9


def decoder_cap(name: str) -> float:
    """Images a second the SD-VAE decoder allows at the check's measured matmul rate."""
    record = gpu(name)
    return (
        record["machine"]["matmul"]["tflops"] * 1e3 / record["sampling"]["decode_gflop_per_image"]
    )


@functools.cache
def step_gflop(name: str) -> float:
    """One ω-interval imf_aux training step's useful GFLOP per image, as the code counts it."""
    from imf_core.guidance import GuidanceConfig
    from imf_core.models import create
    from imf_core.objectives import LossSpec, ObjectiveConfig
    from imf_core.training import step_flops_per_image

    model = create(name, device="meta")
    objective, guidance = ObjectiveConfig(name="imf_aux"), GuidanceConfig(mode="omega_interval")
    return step_flops_per_image(model, LossSpec(objective, guidance, model.cfg.num_classes)) / 1e9


def compiled_grad_err(name: str) -> float:
    return max(e["grad_rel_err"] for e in gpu(name)["compiled"]["entries"])


def xl2_probes() -> dict:
    return gpu(RUN2)["max_batch"]["XL/2"]["probes"]


def xl2_probe(batch: str) -> float:
    return xl2_probes()[batch]


def eager_ms(objective: str) -> float:
    return speed(RUN2, "B/2", objective, "none")["step_ms"]


def date_of(name: str) -> str:
    return gpu(name)["machine"]["date"][:10]


# ------------------------------------------------------------------ formats
def fixed(digits: int) -> Callable[[float], str]:
    return lambda x: f"{x:,.{digits}f}"


def percent(x: float) -> str:
    return f"{100 * x:.1f} %"


def power_of_ten(x: float) -> str:
    """1e-05 -> 10⁻⁵ (a bound that is a power of ten)."""
    exponent = round(math.log10(x))
    assert x == 10.0**exponent, f"{x} is not a power of ten"
    return "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def sci(x: float) -> str:
    """1.2e-07 -> 1.2·10⁻⁷ (two significant digits)."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}·{power_of_ten(10.0 ** int(exponent))}"


@dataclass(frozen=True)
class Quote:
    page: str
    text: str  # as the page has it, `{}` for each number
    source: str  # where the numbers come from (for the failure message)
    readers: tuple[Callable[[], str], ...]

    def rendered(self) -> str:
        return self.text.format(*(read() for read in self.readers))


def q(page: str, text: str, source: str, *readers: Callable[[], str]) -> Quote:
    return Quote(page, text, source, readers)


B2_STEP = ("B/2", "imf_aux", "step")
B2_EAGER = ("B/2", "imf_aux", "none")
LOSS_TEST, RELEASE_TEST = "test_official_loss.py", "test_official.py"
LOSS_BOUND, RELEASE_BOUND = r"rel=(\S+)\)", r"REL_TOL = (\S+)"
IMAGENET_READ, DIGITS_READ = "Latent reader, ImageNet-shaped rows", "Latent reader, 8x8 digit rows"
CPU_STEP = "Step time, CPU, tiny, batch 256, the default: whole step compiled"
CPU_ROWS = (  # the step-time table's CPU rows: (the row's start, its RESULTS.md section)
    ("| CPU, 2 cores, `tiny`, batch 256 | `step` (default)", CPU_STEP),
    ("| | `jvp`", "Step time, CPU, tiny, batch 256, JVP compiled"),
    ("| | `none`", "Step time, CPU, tiny, batch 256, eager"),
)
OBJECTIVES = ("fm", "mf", "imf_boundary", "imf_aux")

QUOTES = [
    # the official fixtures: the bounds the tests assert
    q(
        "README.md",
        "samples within {} relative, as the test asserts",
        f"tests/{RELEASE_TEST}",
        lambda: power_of_ten(asserted(RELEASE_TEST, RELEASE_BOUND)),
    ),
    q(
        "docs/paper-scale.md",
        "samples from `tests/fixtures/official_tiny.pt` (a 4-block, width-64 network in the "
        "release's format, weights and outputs produced by the authors' code) within {} relative",
        f"tests/{RELEASE_TEST}",
        lambda: power_of_ten(asserted(RELEASE_TEST, RELEASE_BOUND)),
    ),
    q(
        "docs/testing.md",
        "reproduces its `u`, `v` and 1- and 2-NFE samples within {} relative",
        f"tests/{RELEASE_TEST}",
        lambda: power_of_ten(asserted(RELEASE_TEST, RELEASE_BOUND)),
    ),
    q(
        "README.md",
        "all 7 weight gradients equal theirs to {} relative",
        f"tests/{LOSS_TEST}",
        lambda: power_of_ten(asserted(LOSS_TEST, LOSS_BOUND)),
    ),
    q(
        "docs/testing.md",
        "the 7 weight gradients equal theirs to {} relative",
        f"tests/{LOSS_TEST}",
        lambda: power_of_ten(asserted(LOSS_TEST, LOSS_BOUND)),
    ),
    q(
        "docs/paper-scale.md",
        "the 7 weight gradients of a tiny network to their JAX step's float64 numbers at {} "
        "relative",
        f"tests/{LOSS_TEST}",
        lambda: power_of_ten(asserted(LOSS_TEST, LOSS_BOUND)),
    ),
    # the H200 checks of 2026-12-04
    q(
        "README.md",
        "| One H200 GPU, {} | iMF-B/2 training step at **{} MFU** compiled",
        RUN2,
        lambda: date_of(RUN2),
        lambda: percent(restated_mfu(RUN2, *B2_STEP)),
    ),
    q(
        "README.md",
        "the check printed {} over its measured matmul rate",
        RUN2,
        lambda: percent(speed(RUN2, *B2_STEP)["mfu"]),
    ),
    q(
        "README.md",
        "the probe's {} was a first step, and a timed step of {} ran out of memory",
        RUN2,
        lambda: str(gpu(RUN2)["max_batch"]["XL/2"]["largest_fitting"]),
        lambda: timed_oom(RUN2, "XL/2", "imf_aux"),
    ),
    q(
        "README.md",
        "1-NFE sampling + SD-VAE decode {} img/s (target 5,000; the decoder alone caps it near {}",
        RUN2,
        lambda: fixed(0)(gpu(RUN2)["sampling"]["bf16"]["decode"]),
        lambda: fixed(0)(round(decoder_cap(RUN2), -2)),
    ),
    q(
        "README.md",
        "compiled step = eager within {} (H200, {})",
        RUN2,
        lambda: sci(compiled_grad_err(RUN2)),
        lambda: date_of(RUN2),
    ),
    q(
        "docs/benchmarks.md",
        "Two runs on one H200 ({}, torch 2.11, {}–{} TFLOP/s measured bf16 matmul)",
        f"{RUN1}, {RUN2}",
        lambda: date_of(RUN2),
        lambda: fixed(0)(gpu(RUN2)["machine"]["matmul"]["tflops"]),
        lambda: fixed(0)(gpu(RUN1)["machine"]["matmul"]["tflops"]),
    ),
    q(
        "docs/benchmarks.md",
        "**{}** compiled (`step`), not met: {} ms a step, {} img/s, {} TFLOP/s of useful FLOPs, "
        "{} GiB; eager {} ({} ms, {} GiB)",
        RUN2,
        lambda: percent(restated_mfu(RUN2, *B2_STEP)),
        lambda: fixed(0)(speed(RUN2, *B2_STEP)["step_ms"]),
        lambda: fixed(0)(speed(RUN2, *B2_STEP)["images_per_s"]),
        lambda: fixed(0)(useful_tflops(RUN2, *B2_STEP)),
        lambda: fixed(1)(speed(RUN2, *B2_STEP)["peak_gib"]),
        lambda: percent(restated_mfu(RUN2, *B2_EAGER)),
        lambda: fixed(0)(speed(RUN2, *B2_EAGER)["step_ms"]),
        lambda: fixed(0)(speed(RUN2, *B2_EAGER)["peak_gib"]),
    ),
    q(
        "docs/benchmarks.md",
        "the report printed {} and {} over its measured matmul rate",
        RUN2,
        lambda: percent(speed(RUN2, *B2_STEP)["mfu"]),
        lambda: percent(speed(RUN2, *B2_EAGER)["mfu"]),
    ),
    q(
        "docs/benchmarks.md",
        "they did not fit); eager {} |",
        RUN2,
        lambda: fixed(2)(
            speed(RUN2, "B/2", "imf_boundary", "none")["step_ms"]
            / speed(RUN2, "B/2", "fm", "none")["step_ms"]
        ),
    ),
    q(
        "docs/benchmarks.md",
        "the probe's {} ({} GiB) was a first step, before AdamW's {} GiB of state, and a timed "
        "step of {} ran out of memory; 96's first step took {} GiB, + {} = {} of {}.",
        f"{RUN2}; AdamW's state from the XL/2 preset",
        lambda: str(gpu(RUN2)["max_batch"]["XL/2"]["largest_fitting"]),
        lambda: fixed(1)(xl2_probe("112")),
        lambda: fixed(1)(adam_gib("imf_xl2")),
        lambda: timed_oom(RUN2, "XL/2", "imf_aux"),
        lambda: fixed(1)(xl2_probe("96")),
        lambda: fixed(1)(adam_gib("imf_xl2")),
        lambda: fixed(1)(xl2_probe("96") + round(adam_gib("imf_xl2"), 1)),
        lambda: fixed(1)(gpu(RUN2)["machine"]["gpu_memory_gib"]),
    ),
    q(
        "configs/sweep/table2_sizes.yaml",
        "first step: 96 took {} GiB (+ {} GiB of AdamW state: {} of {}, so 96 is expected to fit, "
        "not measured in a steady state), 112 took {} GiB and ran out of memory in a timed step",
        f"{RUN2}; AdamW's state from the XL/2 preset",
        lambda: fixed(1)(xl2_probe("96")),
        lambda: fixed(1)(adam_gib("imf_xl2")),
        lambda: fixed(1)(xl2_probe("96") + round(adam_gib("imf_xl2"), 1)),
        lambda: fixed(1)(gpu(RUN2)["machine"]["gpu_memory_gib"]),
        lambda: fixed(1)(xl2_probe("112")),
    ),
    q(
        "docs/benchmarks.md",
        "{} img/s bf16 ({} fp32).",
        RUN2,
        lambda: fixed(0)(gpu(RUN2)["sampling"]["bf16"]["decode"]),
        lambda: fixed(0)(gpu(RUN2)["sampling"]["fp32"]["decode"]),
    ),
    q(
        "docs/benchmarks.md",
        "Generation alone {} img/s, Inception features {} img/s",
        RUN2,
        lambda: fixed(0)(round(gpu(RUN2)["sampling"]["bf16"]["generate"], -1)),
        lambda: fixed(0)(round(gpu(RUN2)["sampling"]["bf16"]["features"], -2)),
    ),
    q(
        "docs/benchmarks.md",
        "| compiled step vs eager, fp32 | 1e-4 | ≤ {}, all four objectives (inductor) |",
        RUN2,
        lambda: sci(compiled_grad_err(RUN2)),
    ),
    q(
        "docs/benchmarks.md",
        "over their measured matmul rate ({} and {} TFLOP/s)",
        f"{RUN1}, {RUN2}",
        lambda: fixed(1)(gpu(RUN1)["machine"]["matmul"]["tflops"]),
        lambda: fixed(1)(gpu(RUN2)["machine"]["matmul"]["tflops"]),
    ),
    q(
        "docs/benchmarks.md",
        "the compiled B/2 `imf_aux` step printed as {} is **{}**: {} useful GFLOP per image × {} "
        "img/s = {} TFLOP/s over 989.4 ({} of that run's measured matmul rate)",
        RUN2,
        lambda: percent(speed(RUN2, *B2_STEP)["mfu"]),
        lambda: percent(restated_mfu(RUN2, *B2_STEP)),
        lambda: fixed(1)(useful_gflop(RUN2, *B2_STEP)),
        lambda: fixed(1)(speed(RUN2, *B2_STEP)["images_per_s"]),
        lambda: fixed(0)(useful_tflops(RUN2, *B2_STEP)),
        lambda: percent(useful_tflops(RUN2, *B2_STEP) / gpu(RUN2)["machine"]["matmul"]["tflops"]),
    ),
    q(
        "docs/benchmarks.md",
        "multiplies `x` by the weight's zero tangent too: {} of the {} GFLOP per image counted for "
        "B/2 `imf_aux` on {}",
        f"{RUN2}; the zero-tangent GEMMs from the B/2 preset (flows.gpu_rates.recorded_zero_gemms)",
        lambda: fixed(2)(zero_gemm_gflop("B/2", "imf_aux")),
        lambda: fixed(1)(speed(RUN2, *B2_STEP)["gflop_per_image"]),
        lambda: date_of(RUN2),
    ),
    # FLOPs per image, from the code
    q(
        "docs/benchmarks.md",
        "B/2 `imf_aux` (ω-interval CFG) counts **{}** GFLOP per image (XL/2: {}), counted on the "
        "meta device",
        "imf_core.training.step_flops_per_image",
        lambda: fixed(1)(step_gflop("imf_b2")),
        lambda: fixed(1)(step_gflop("imf_xl2")),
    ),
    q(
        "docs/cluster.md",
        "(B/2 imf_aux with ω-interval CFG: {} GFLOP per image as the code counts it",
        "imf_core.training.step_flops_per_image",
        lambda: fixed(1)(step_gflop("imf_b2")),
    ),
    q(
        "docs/benchmarks.md",
        "| H200, `imf_b2`, batch 256, bf16 | `step` | {} (run 1) | — | — | not measured ({} ms in "
        "run 2: {} × run 1's fm, two runs) | | | `none` | {} | {} | {} | {} |",
        f"{RUN1}, {RUN2}",
        lambda: fixed(1)(speed(RUN1, "B/2", "fm", "step")["step_ms"]),
        lambda: fixed(0)(speed(RUN2, *B2_STEP)["step_ms"]),
        lambda: fixed(2)(
            speed(RUN2, *B2_STEP)["step_ms"] / speed(RUN1, "B/2", "fm", "step")["step_ms"]
        ),
        lambda: fixed(0)(eager_ms("fm")),
        *(lambda o=o: fixed(2)(eager_ms(o) / eager_ms("fm")) for o in OBJECTIVES[1:]),
    ),
    q(
        "docs/train.md",
        "(136 s for B/2 on the H200 on {}",
        RUN2,
        lambda: date_of(RUN2),
    ),
    q(
        "docs/train.md",
        "step's compile ({} s for B/2 on the H200",
        RUN2,
        lambda: fixed(0)(speed(RUN2, *B2_STEP)["first_step_s"]),
    ),
    # the CPU step times and the latent reader (benchmarks/RESULTS.md)
    q(
        "docs/benchmarks.md",
        "GPU with a datasheet peak, its [MFU](#mfu) (on the CPU the table says there is none). "
        "Median of 15 steps, {}:",
        "benchmarks/RESULTS.md",
        results_date,
    ),
    *(
        q(
            "docs/benchmarks.md",
            f"{prefix} | {{}} | {{}} | {{}} | {{}} |",
            "benchmarks/RESULTS.md",
            lambda h=heading: fixed(0)(results(h)["step_ms"]["fm"]),
            *(
                lambda h=heading, o=o: fixed(2)(results(h)[f"ratio_{o}_to_fm"])
                for o in OBJECTIVES[1:]
            ),
        )
        for prefix, heading in CPU_ROWS
    ),
    q(
        "docs/benchmarks.md",
        "`benchmarks/RESULTS.md` ({}, 2 CPU cores): for ImageNet-shaped rows (2×4×32×32 float32, "
        "32 KiB) the Dataset reads **{}×** the raw rate ({} rows/s against {}); for 8×8 digit "
        "rows **{}×** of a raw bulk read ({} rows/s against {})",
        "benchmarks/RESULTS.md",
        results_date,
        lambda: fixed(2)(results(IMAGENET_READ)["ratio_dataset_to_raw"]),
        lambda: fixed(0)(results(IMAGENET_READ)["dataset_rows_per_s"]),
        lambda: fixed(0)(results(IMAGENET_READ)["raw_rows_per_s"]),
        lambda: fixed(2)(results(DIGITS_READ)["ratio_dataset_to_raw"]),
        lambda: fixed(0)(results(DIGITS_READ)["dataset_rows_per_s"]),
        lambda: fixed(0)(results(DIGITS_READ)["raw_rows_per_s"]),
    ),
    q(
        "docs/benchmarks.md",
        "the same file's fastest `tiny` step: {} images/s",
        "benchmarks/RESULTS.md",
        lambda: fixed(1)(results(CPU_STEP)["images_per_s_fm"]),
    ),
    # the B/2 checkpoint, from the code
    q(
        "docs/train.md",
        "The code counts one B/2 checkpoint as {} GB (`tasks.train.checkpoint_bytes`: model, EMA "
        "and Adam's two moments in float32, {} M parameters each with the aux head; the 1-NFE "
        "network alone is {} M)",
        "tasks.train.checkpoint_bytes, imf_core.models.count_params",
        lambda: fixed(2)(b2_checkpoint_gb()),
        lambda: fixed(1)(params_m("imf_b2", inference=False)),
        lambda: fixed(1)(params_m("imf_b2", inference=True)),
    ),
    q(
        "docs/configuration.md",
        "the newest kept on disk (B/2: {} GB each, checkpoint_bytes)",
        "tasks.train.checkpoint_bytes",
        lambda: fixed(2)(b2_checkpoint_gb()),
    ),
    # the object store's lease, from the code
    q(
        "docs/cluster.md",
        "renewed by its holder every {} s, taken over when a crashed holder lets it expire ({} s)",
        "tasks.lease.LEASE_S",
        lambda: fixed(0)(lease_s() / 3),
        lambda: fixed(0)(lease_s()),
    ),
    q(
        "docs/cluster.md",
        "The cache is bounded by `IMF_CACHE_MAX_GB` (default {} GB;",
        "tasks.object_store.CACHE_MAX_GB",
        lambda: fixed(0)(cache_max_gb()),
    ),
    q(
        "docs/reliability.md",
        "and it is taken over once expired ({} s)",
        "tasks.lease.LEASE_S",
        lambda: fixed(0)(lease_s()),
    ),
]


def lease_s() -> float:
    from tasks.lease import LEASE_S

    return LEASE_S


def cache_max_gb() -> float:
    from tasks.object_store import CACHE_MAX_GB

    return CACHE_MAX_GB


def flat(path: Path) -> str:
    """The file's text with line breaks (and a YAML comment's `#`) read as spaces."""
    text = path.read_text()
    if path.suffix == ".yaml":
        text = re.sub(r"^\s*#\s?", "", text, flags=re.M)
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("quote", QUOTES, ids=lambda q: f"{q.page}: {q.text[:40]}")
def test_the_quoted_numbers_are_their_sources(quote):
    expected = quote.rendered()
    assert expected in flat(ROOT / quote.page), (
        f"{quote.page} should say {expected!r} (from {quote.source}); "
        "change the page, or find out why the source changed"
    )


def test_a_quote_that_disagrees_with_its_source_is_found(tmp_path):
    page = tmp_path / "page.md"
    quote = q("page.md", "reads **{}×** the raw", "RESULTS.md", lambda: "1.58")
    page.write_text("The Dataset reads\n**1.70×** the raw rate.")
    assert quote.rendered() not in flat(page)
    page.write_text("The Dataset reads\n**1.58×** the raw rate.")
    assert quote.rendered() in flat(page)
    comment = tmp_path / "sweep.yaml"
    comment.write_text("# the Dataset reads\n# **1.58×** the raw rate\ntitle: x\n")
    assert quote.rendered() in flat(comment)


def test_the_compose_mlflow_server_is_the_locked_client_version():
    """infra/docker-compose.yml's MLflow server image is the version requirements.lock installs
    as the client (a 3.1.0 server once answered 3.17.2 clients)."""
    compose = (ROOT / "infra" / "docker-compose.yml").read_text()
    tag = re.search(r"image:\s*ghcr\.io/mlflow/mlflow:v(\S+)", compose).group(1)
    locked = re.search(r"^mlflow==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert tag == locked.group(1)
