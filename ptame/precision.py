"""Which floating-point precision to compute in, chosen from what the hardware does natively.

bf16 autocast is 1.5-2.5x faster on CPUs with bf16 units (AVX512-BF16 or AMX on x86, BF16 on
Arm) but *emulated*, about 20x slower, on CPUs without them (AVX2-only x86: most laptops, AMD
servers and many cloud VMs). ``amp="auto"`` (the default everywhere) therefore autocasts on a CPU
only where bf16 is native; GPUs autocast to bf16 (Ampere and newer) or fp16 with a GradScaler.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["AMP_CHOICES", "Precision", "check_amp", "choose_precision", "cpu_bf16", "precision_for"]

logger = logging.getLogger(__name__)

Amp = bool | Literal["auto"]
#: the values ``amp`` takes in params.yaml, ``TrainConfig`` and RISE
AMP_CHOICES = (True, False, "auto")


@dataclass(frozen=True)
class Precision:
    """The dtype to autocast to (``torch.float32``: no autocast) and why, in one line."""

    dtype: torch.dtype
    reason: str

    @property
    def enabled(self) -> bool:
        """Whether autocast is on."""
        return self.dtype != torch.float32

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling (a ``GradScaler``); bf16 and fp32 do not."""
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        """``float32``, ``bfloat16`` or ``float16``."""
        return str(self.dtype).removeprefix("torch.")

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to this dtype on ``device`` (a no-op context for float32)."""
        kind = torch.device(device).type
        return torch.autocast(kind, dtype=self.dtype) if self.enabled else contextlib.nullcontext()

    def describe(self) -> str:
        """``"<dtype>: <why>"``, the line training and evaluation log first."""
        return f"{self.name}: {self.reason}"


def check_amp(amp: Any, name: str = "amp") -> Amp:
    """``amp`` if it is ``True``, ``False`` or ``"auto"``; otherwise a ``ValueError`` naming it."""
    if isinstance(amp, bool) or amp == "auto":
        return amp
    raise ValueError(f"{name} must be true, false or auto, got {amp!r}")


def _arm_bf16_from_cpuinfo(path: str = "/proc/cpuinfo") -> bool:
    try:
        text = Path(path).read_text()
    except OSError:
        return False
    return any(line.lower().startswith("features") and " bf16" in f" {line.split(':', 1)[-1]} " for line in text.splitlines())


@lru_cache(maxsize=1)
def _host_capabilities() -> dict[str, Any]:
    caps: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # torch.cpu.get_capabilities is missing on some builds/arches
        caps.update(torch.cpu.get_capabilities())
    caps.setdefault("architecture", platform.machine())
    if str(caps["architecture"]).lower() in ("aarch64", "arm64") and "bf16" not in caps:
        caps["bf16"] = _arm_bf16_from_cpuinfo()
    return caps


def cpu_bf16(capabilities: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    """Whether the CPU computes bf16 natively, and the instruction set that says so.

    Args:
        capabilities: what ``torch.cpu.get_capabilities()`` reports (``avx512_bf16``, ``amx_bf16``,
            ``avx2``, ``architecture``; Arm: ``bf16``); ``None`` reads this machine's.
    """
    caps = dict(_host_capabilities() if capabilities is None else capabilities)
    if caps.get("amx_bf16"):
        return True, "AMX"
    if caps.get("avx512_bf16"):
        return True, "AVX512-BF16"
    if caps.get("bf16") or caps.get("arm_bf16") or caps.get("sve_bf16"):
        return True, "Arm BF16"
    for flag, label in (("avx512_f", "AVX-512 without BF16"), ("avx2", "AVX2"), ("sve", "Arm SVE"), ("asimd", "Arm NEON")):
        if caps.get(flag):
            return False, label
    return False, str(caps.get("architecture") or "unknown ISA")


def choose_precision(
    amp: Amp,
    device: torch.device | str = "cpu",
    capabilities: Mapping[str, Any] | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> Precision:
    """The precision ``amp`` asks for on ``device``: the decision, with no side effects.

    Args:
        amp: ``"auto"``: bf16 where the hardware has it natively (a CPU with AVX512-BF16, AMX or
            Arm BF16; a GPU of compute capability 8.0 or newer), fp16 on older GPUs, else float32.
            ``True``: autocast whatever the CPU (bf16; fp16 on older GPUs). ``False``: float32.
        device: where the computation runs.
        capabilities: the CPU's features as :func:`cpu_bf16` takes them (``None``: this machine's).
        cuda_capability: the GPU's ``(major, minor)`` (``None``: read from ``device``).
    """
    amp = check_amp(amp)
    device = torch.device(device)
    if amp is False:
        return Precision(torch.float32, "mixed precision off (amp: false)")
    if device.type == "cuda":
        major, minor = cuda_capability or torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision(torch.bfloat16, f"the GPU has native bf16 (compute capability {major}.{minor})")
        return Precision(torch.float16, f"fp16 with loss scaling: the GPU has no bf16 (compute capability {major}.{minor})")
    if device.type != "cpu":
        return Precision(torch.float32, f"no mixed precision on {device.type}")
    native, isa = cpu_bf16(capabilities)
    if native:
        return Precision(torch.bfloat16, f"this CPU has native bf16 ({isa})")
    if amp is True:
        return Precision(torch.bfloat16, f"amp: true forces bf16, but this CPU has no native bf16 ({isa}): "
                                         "emulated, about 20x slower than float32; use amp: auto")
    return Precision(torch.float32, f"this CPU has no native bf16 ({isa})")


def precision_for(amp: Amp, device: torch.device | str = "cpu", what: str = "") -> Precision:
    """:func:`choose_precision` for this machine, logged once as ``<what> precision <dtype>: <why>``."""
    precision = choose_precision(amp, device)
    log = logger.warning if precision.enabled and "emulated" in precision.reason else logger.info
    log("%sprecision %s", f"{what} " if what else "", precision.describe())
    return precision
