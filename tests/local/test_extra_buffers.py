"""llama.cpp's extra buffer types (weight repacking, AMX) and the CPUs that need them off.

On CPUs that report AMX, llama.cpp's AMX buffer type crashes on the first decode of more
than one token (llama.cpp issue 20824), so ``fanflow.local()`` turns extra buffers off
there. The detection is fed fake /proc/cpuinfo files (the CPU running the tests may have
no AMX), and the setting is checked where it lands, in the buffer types llama.cpp reports
loading the weights into (read by the worker from llama.cpp's own log). Generated text is
never compared across the two settings: it differs from CPU to CPU.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fanflow

local_module = importlib.import_module("fanflow.providers._local")

SAPPHIRE_RAPIDS = "fpu vme avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8"
EPYC = "fpu vme avx2 avx512f avx512_bf16 avx512_vnni"


# SmolLM2's Q4_1 weights are not repacked on this CPU (llama.cpp's CPU_REPACK takes Q4_0,
# Q4_K, IQ4_NL and Q8_0 here; the AMX buffer type takes Q4_1 too). A Q4_0 copy is.
QUANTIZE = textwrap.dedent(
    """
    import sys, llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
    """
)


@pytest.fixture(scope="module")
def q4_0_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 requantized to Q4_0 (about 2 s), in a subprocess like all llama.cpp work."""
    out = tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct.Q4_0.gguf"
    source = str(local_module.default_model_path())
    done = subprocess.run(
        [sys.executable, "-c", QUANTIZE, source, str(out)], capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    """A /proc/cpuinfo of two cores with ``flags``."""
    path = tmp_path / "cpuinfo"
    path.write_text(
        "".join(
            f"processor\t: {n}\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\n" for n in range(2)
        )
    )
    return path


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    flags = local_module.cpu_flags(cpuinfo(tmp_path, SAPPHIRE_RAPIDS))
    assert {"amx_tile", "amx_int8", "amx_bf16", "avx2"} <= flags
    assert "GenuineIntel" not in flags
    assert local_module.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("explicit", "env", "flags", "expected"),
    [
        (None, {}, SAPPHIRE_RAPIDS, False),  # AMX: off
        (None, {}, EPYC, True),  # no AMX: llama.cpp's default
        (None, {"FANFLOW_LOCAL_EXTRA_BUFFERS": "1"}, SAPPHIRE_RAPIDS, True),
        (None, {"FANFLOW_LOCAL_EXTRA_BUFFERS": "off"}, EPYC, False),
        (None, {"FANFLOW_LOCAL_EXTRA_BUFFERS": "auto"}, SAPPHIRE_RAPIDS, False),
        (True, {"FANFLOW_LOCAL_EXTRA_BUFFERS": "0"}, SAPPHIRE_RAPIDS, True),  # argument wins
        (False, {"FANFLOW_LOCAL_EXTRA_BUFFERS": "1"}, EPYC, False),
    ],
)
def test_the_argument_then_the_variable_then_the_cpu_decide(
    explicit: bool | None, env: dict[str, str], flags: str, expected: bool
) -> None:
    got = local_module.extra_buffers_default(explicit, env=env, flags=flags.split())
    assert got is expected


def test_a_bad_variable_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANFLOW_LOCAL_EXTRA_BUFFERS", "maybe")
    with pytest.raises(fanflow.ConfigError, match=r"must be 1, 0 or auto, got 'maybe'"):
        fanflow.local()


async def test_fake_amx_flags_turn_extra_buffers_off_in_llama_cpp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, q4_0_model: Path
) -> None:
    # Only what holds on every CPU: the buffer types llama.cpp reports, and a generation of
    # more than one token with extra buffers off. Never the text across the two settings:
    # the repacked kernels round differently from the plain ones on some CPUs (on an AVX2
    # EPYC the two replies differ after a few tokens; issue 28).
    monkeypatch.delenv("FANFLOW_LOCAL_EXTRA_BUFFERS", raising=False)
    monkeypatch.setattr(local_module, "CPUINFO", cpuinfo(tmp_path, SAPPHIRE_RAPIDS))
    request = fanflow.Request.of("Count to five.", temperature=0.0, max_tokens=8)
    async with fanflow.local(q4_0_model, instances=1, threads=1) as amx:
        assert amx.extra_buffers is False
        off_reply = await amx.complete(request)
        off = amx.pool_statistics().model_buffers
    monkeypatch.setattr(local_module, "CPUINFO", cpuinfo(tmp_path, EPYC))
    async with fanflow.local(q4_0_model, instances=1, threads=1) as plain:
        assert plain.extra_buffers is True
        # Loaded, not run: on a real AMX CPU a generation here is the crash (0080).
        await plain.load()
        on = plain.pool_statistics().model_buffers
    assert off == ("CPU_Mapped",)  # no extra buffer type while they are off
    assert off_reply.usage.output_tokens > 1  # more than one token: where AMX crashed
    assert off_reply.finish_reason in ("stop", "length")
    if "avx2" in local_module.cpu_flags(Path("/proc/cpuinfo")):
        # llama.cpp repacks Q4_0 for AVX2 (CPU_REPACK), or takes it into AMX where the
        # CPU has it; a CPU with neither has no extra buffer type to show.
        assert {"CPU_REPACK", "AMX"} & set(on)


async def test_the_default_model_loads_as_asked_with_extra_buffers_off() -> None:
    async with fanflow.local(instances=1, threads=1, extra_buffers=False) as llm:
        reply = await llm.complete(fanflow.Request.of("Count to five.", max_tokens=8))
        buffers = llm.pool_statistics().model_buffers
    assert reply.usage.output_tokens > 1
    assert not {"CPU_REPACK", "AMX"} & set(buffers)
