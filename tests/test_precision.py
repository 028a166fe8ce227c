"""The precision decision (ptame.precision): bf16 only where the hardware has it natively."""

from __future__ import annotations

import logging

import pytest
import torch

from ptame.precision import check_amp, choose_precision, cpu_bf16, precision_for

AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
AVX512 = {**AVX2, "avx512_f": True}
AVX512_BF16 = {**AVX512, "avx512_bf16": True}
AMX = {**AVX512_BF16, "amx_bf16": True}
GRAVITON3 = {"architecture": "aarch64", "bf16": True, "sve": True}
GRAVITON2 = {"architecture": "aarch64", "bf16": False, "asimd": True}


@pytest.mark.parametrize(
    ("caps", "native", "isa"),
    [(AVX2, False, "AVX2"), (AVX512, False, "AVX-512 without BF16"), (AVX512_BF16, True, "AVX512-BF16"),
     (AMX, True, "AMX"), (GRAVITON3, True, "Arm BF16"), (GRAVITON2, False, "Arm NEON")],
)  # fmt: skip
def test_native_bf16_by_instruction_set(caps, native, isa) -> None:
    assert cpu_bf16(caps) == (native, isa)


@pytest.mark.parametrize(
    ("amp", "device", "caps", "cuda", "dtype", "says"),
    [
        ("auto", "cpu", AVX2, None, torch.float32, "float32: this CPU has no native bf16 (AVX2)"),
        ("auto", "cpu", AVX512, None, torch.float32, "no native bf16 (AVX-512 without BF16)"),
        ("auto", "cpu", AVX512_BF16, None, torch.bfloat16, "bfloat16: this CPU has native bf16 (AVX512-BF16)"),
        ("auto", "cpu", AMX, None, torch.bfloat16, "native bf16 (AMX)"),
        ("auto", "cpu", GRAVITON3, None, torch.bfloat16, "native bf16 (Arm BF16)"),
        ("auto", "cuda", AVX2, (8, 0), torch.bfloat16, "the GPU has native bf16 (compute capability 8.0)"),
        ("auto", "cuda", AVX2, (9, 0), torch.bfloat16, "compute capability 9.0"),
        ("auto", "cuda", AVX2, (7, 5), torch.float16, "fp16 with loss scaling"),
        (True, "cpu", AVX2, None, torch.bfloat16, "emulated, about 20x slower"),
        (True, "cpu", AMX, None, torch.bfloat16, "native bf16 (AMX)"),
        (True, "cuda", AVX2, (7, 0), torch.float16, "no bf16"),
        (False, "cpu", AMX, None, torch.float32, "amp: false"),
        (False, "cuda", AVX2, (9, 0), torch.float32, "amp: false"),
    ],
)  # fmt: skip
def test_decision_over_the_cases(amp, device, caps, cuda, dtype, says) -> None:
    precision = choose_precision(amp, device, capabilities=caps, cuda_capability=cuda)
    assert precision.dtype == dtype
    assert says in precision.describe()
    assert precision.enabled == (dtype != torch.float32)
    assert precision.needs_scaler == (dtype == torch.float16)


def test_bad_amp_values_are_refused_by_name() -> None:
    for bad in ("yes", 1, None, "bf16"):
        with pytest.raises(ValueError, match="TrainConfig.amp must be true, false or auto"):
            check_amp(bad, "TrainConfig.amp")
    with pytest.raises(ValueError, match="amp"):
        choose_precision("on", "cpu")


def test_autocast_runs_in_the_chosen_dtype_and_float32_is_untouched() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.rand(2, 4)
    with choose_precision(True, "cpu", capabilities=AMX).autocast("cpu"):
        assert layer(x).dtype == torch.bfloat16
    with choose_precision("auto", "cpu", capabilities=AVX2).autocast("cpu"):
        assert layer(x).dtype == torch.float32


def test_this_machine_is_read_and_logged(caplog) -> None:
    native, isa = cpu_bf16()
    with caplog.at_level(logging.INFO, logger="ptame.precision"):
        precision = precision_for("auto", "cpu", "training")
    assert precision.dtype == (torch.bfloat16 if native else torch.float32)
    assert f"training precision {precision.name}: " in caplog.text and isa in caplog.text
