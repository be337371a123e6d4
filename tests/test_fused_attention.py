"""The fused attention + tangent kernel (imf_core/models/fused_attention.py) against float64 math.

Triton's interpreter runs the kernel on the CPU, but only for kernels decorated while
TRITON_INTERPRET=1 is set, i.e. imported after it: this file runs itself in a subprocess with it set
(`python tests/test_fused_attention.py OUT.pt`), which runs every case eagerly and under
torch.compile and saves inputs and outputs; the tests compare those with float64 math here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# (batch, heads, tokens, head dim, dtype): B/2's 276 tokens (256 patches + 20 conditions), 256 (an
# adaLN DiT), tiny's 22 (head dim 16), a single token; head dim 64 (B/2, L/2, XL/2), 72 (MF XL/2:
# 1152 / 16, padded to 128), 32, and sequences that end inside a key block from both sides.
CASES = {
    "fp32-276x64": (1, 2, 276, 64, torch.float32),
    "fp32-256x64": (2, 1, 256, 64, torch.float32),
    "fp32-22x16": (2, 3, 22, 16, torch.float32),
    "fp32-1x64": (3, 2, 1, 64, torch.float32),
    "fp32-37x32": (1, 2, 37, 32, torch.float32),
    "fp32-70x72": (1, 1, 70, 72, torch.float32),
    "bf16-276x64": (1, 2, 276, 64, torch.bfloat16),
    "bf16-256x64": (1, 1, 256, 64, torch.bfloat16),
    "bf16-22x16": (2, 2, 22, 16, torch.bfloat16),
    "bf16-1x32": (2, 1, 1, 32, torch.bfloat16),
    "bf16-100x72": (1, 1, 100, 72, torch.bfloat16),
    "fp16-50x32": (1, 2, 50, 32, torch.float16),
}
# Relative error (max |error| / max |reference|) allowed per dtype: fp32 products and sums leave
# ~1e-6; bf16 rounds q, k, v and P (as math attention in bf16 does) to 8 bits of mantissa.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_inputs(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype):
    """q, k, v, dq, dk, dv, each (B, H, T, K). q, k, v are views of one (B, T, 3, H, K) tensor as
    the model's qkv projection leaves them (strided, not contiguous); unit entries as after the
    q, k RMSNorm."""
    gen = torch.Generator().manual_seed(batch * 1000 + tokens * 10 + head_dim)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=gen)
    q, k, v = qkv.to(dtype).permute(2, 0, 3, 1, 4)  # (B, H, T, K) each
    tangents = (torch.randn(batch, heads, tokens, head_dim, generator=gen) for _ in range(3))
    return (q, k, v, *(t.to(dtype) for t in tangents))


def reference(q, k, v, dq, dk, dv):
    """Attention and its tangent in float64 by forward-mode AD of the written-out formula."""

    def attend(q, k, v):
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v

    primals, tangents = (q, k, v), (dq, dk, dv)
    return torch.func.jvp(
        attend, tuple(x.double() for x in primals), tuple(x.double() for x in tangents)
    )


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def run_interpreted(out_path: str) -> None:
    """The subprocess: every case eagerly and compiled (fullgraph, aot_eager), the compiled graph's
    op targets, and the op's own consistency check (torch.library.opcheck) on a small case."""
    torch.set_num_threads(1)
    from imf_core.models.fused_attention import FUSED_ATTENTION_AVAILABLE, fused_attention_jvp

    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def tangent_pass(q, k, v, dq, dk, dv):  # the op between ordinary ops, as in the model
        out, d_out = fused_attention_jvp(q * 1.0, k, v, dq, dk, dv)
        return out + 0.0, d_out * 1.0

    compiled = torch.compile(tangent_pass, fullgraph=True, backend=recording_aot_eager)
    results = {"available": FUSED_ATTENTION_AVAILABLE, "cases": {}}
    with torch.no_grad():
        for name, shape in CASES.items():
            inputs = make_inputs(*shape)
            results["cases"][name] = dict(
                inputs=[x.contiguous() for x in inputs],
                eager=fused_attention_jvp(*inputs),
                compiled=compiled(*inputs) if name in ("fp32-276x64", "bf16-22x16") else None,
            )
        torch.library.opcheck(
            torch.ops.imf.attention_jvp.default, make_inputs(1, 1, 22, 16, torch.float32)
        )
    results["graphs"] = graphs
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    pytest.importorskip("triton", reason="the fused attention kernel is written in Triton")
    out = tmp_path_factory.mktemp("fused_attention") / "results.pt"
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("name", CASES)
def test_values_and_tangents_match_float64_math(interpreted, name):
    case = interpreted["cases"][name]
    out, d_out = case["eager"]
    ref_out, ref_d_out = reference(*case["inputs"])
    dtype = CASES[name][-1]
    assert out.dtype == d_out.dtype == dtype and out.shape == ref_out.shape
    assert relative_error(out, ref_out) < TOLERANCE[dtype]
    assert relative_error(d_out, ref_d_out) < TOLERANCE[dtype]


def test_compiled_fullgraph_keeps_one_op_with_the_same_result(interpreted):
    assert interpreted["available"]  # the interpreter counts as a device
    # one graph (fullgraph: no break) per dtype, each calling the custom op once
    assert len(interpreted["graphs"]) == 2
    for graph in interpreted["graphs"]:
        assert sum("imf.attention_jvp" in target for target in graph) == 1, graph
    for name in ("fp32-276x64", "bf16-22x16"):
        case = interpreted["cases"][name]
        for eager, compiled in zip(case["eager"], case["compiled"], strict=True):
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def bad_inputs():
    good = [torch.zeros(1, 2, 8, 16) for _ in range(6)]
    yield "non-4-D", [torch.zeros(2, 8, 16)] + good[1:], "must be (B, H, T, K)"
    yield "shape", good[:3] + [torch.zeros(1, 2, 9, 16)] + good[4:], "must share shape"
    yield "dtype", good[:5] + [torch.zeros(1, 2, 8, 16, dtype=torch.float64)], "must share"
    yield "float64", [x.double() for x in good], "dtype must be one of"
    yield "head dim", [torch.zeros(1, 2, 8, 300) for _ in range(6)], "head dim must be"
    yield "empty", [torch.zeros(1, 2, 0, 16) for _ in range(6)], "sequence is empty"


@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda case: case[0])
def test_bad_inputs_are_refused_with_a_reason(case):  # checked before Triton is needed
    from imf_core.models.fused_attention import fused_attention_jvp

    _, inputs, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        fused_attention_jvp(*inputs)


def test_cpu_tensors_without_the_interpreter_are_refused():
    pytest.importorskip("triton", reason="the fused attention kernel is written in Triton")
    from imf_core.models import fused_attention

    if fused_attention.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set in this process: CPU tensors are allowed")
    assert fused_attention.FUSED_ATTENTION_AVAILABLE == torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        fused_attention.fused_attention_jvp(*(torch.zeros(1, 2, 8, 16) for _ in range(6)))


if __name__ == "__main__":
    run_interpreted(sys.argv[1])
