"""Device and precision: which device trains, whether bf16 autocast is used, and the names forms show."""

from __future__ import annotations

import contextlib
import os
import platform

import torch


def select_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"Device '{spec}' asked for, but PyTorch sees no CUDA GPU here.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"Device '{spec}' asked for, but only {torch.cuda.device_count()} GPU(s) exist.")
    return device


def uses_bf16(device: torch.device, precision: str) -> bool:
    """auto: bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX), where oneDNN runs
    convolutions about 2.5x faster than fp32; fp32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device_without_waiting(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`, copied without the host waiting for the device's queued work (a GPU copies
    from pinned memory; the caching host allocator keeps the pinned block until the copy is done)."""
    if device.type == "cpu":
        return values
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def choose_fast_kernels(device: torch.device) -> None:
    """On a GPU, let cuDNN time its convolution algorithms once per input shape and keep the fastest, as
    torchvision's classification reference does: a run's shapes repeat (one image size, one batch size). The
    choice may differ between runs, like the GPU's other non-deterministic kernels; CPUs have nothing to choose."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def optimizer_options(device: torch.device) -> dict:
    """Keyword arguments for Adam/AdamW: the fused kernel (one pass over all parameters) where PyTorch has it. On a
    2-core CPU it steps resnet18's 11 M parameters in 8 ms against 35 ms for the default per-tensor loop."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


def available_devices() -> list[str]:
    """Device choices for forms: auto, cpu, and every GPU found."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return out


def device_names() -> dict[str, str]:
    names = {"cpu": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            names[f"cuda:{i}"] = torch.cuda.get_device_name(i)
    return names


# Devices on which bench/benchmark_pipeline.py measured torch.compile faster for training (compile: auto). None yet:
# compiling costs 1-2 minutes up front and was not measured faster on a 2-core CPU; on CUDA it is unmeasured here.
COMPILE_MEASURED_FASTER: frozenset[str] = frozenset()


def maybe_compile(net: torch.nn.Module, setting: str, device: torch.device) -> torch.nn.Module:
    """The network to train: torch.compile'd when `setting` is on (or auto on a device where it was measured
    faster), else as it is. Compilation happens lazily, at the first step."""
    if setting == "on" or (setting == "auto" and device.type in COMPILE_MEASURED_FASTER):
        return torch.compile(net)
    return net


ALL_GPUS = "all GPUs"


def device_choices() -> list[str]:
    """The dashboard's device choices: available_devices(), and 'all GPUs (N)' where there are several GPUs (a
    torchrun process on each)."""
    choices = available_devices()
    gpus = sum(1 for d in choices if d.startswith("cuda:"))
    return choices + ([f"{ALL_GPUS} ({gpus})"] if gpus > 1 else [])


def device_and_processes(choice: str) -> tuple[str, int]:
    """A device choice as the config's (device, processes): 'all GPUs (8)' is ('cuda', 8)."""
    if choice.startswith(ALL_GPUS):
        return "cuda", int(choice[len(ALL_GPUS):].strip(" ()"))
    return choice, 1
