"""Where a training step's time goes on this machine, against the compute limit benchmark_pipeline.py prints.

Core's full fine-tuning step (resnet18 at 224 px, batch 32, channels-last, bf16 autocast where the CPU has it
natively, fused AdamW) is profiled with torch.profiler, and each operator's own time is put in a group:
convolutions (forward and backward), batch norm, ReLU, pooling, copies and casts (autocast's bf16 weights, fills),
the optimizer, the rest. The convolutions' rate (their FLOPs from torch.utils.flop_counter over their measured time)
is printed next to the machine's matmul rate measured in the same run, and so is the step's ceiling if everything
but the convolutions took no time. That ceiling, as a share of the compute limit, says how far core's share of the
limit can rise without fusing the memory-bound operators into the convolutions.

    .venv/bin/python bench/profile_step.py [--steps 3] [--batch 32] [--image-size 224] [--precision auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_pipeline import bf16_native, matmul_gflops  # noqa: E402

from core.device import autocast, optimizer_options  # noqa: E402
from core.model import apply_strategy, build_model  # noqa: E402

# Operator name fragments -> group; the first that matches wins.
GROUPS = [
    ("optimizer", ("adam", "optimizer.")),  # first: "Optimizer.zero_grad#AdamW.zero_grad" is the optimizer's
    ("convolution", ("convolution",)),
    ("batch norm", ("batch_norm", "batchnorm")),  # aten ops, and autograd's NativeBatchNormBackward0 node
    ("ReLU", ("threshold_backward", "relu", "clamp_min")),
    ("pooling", ("pool",)),
    ("copies, casts, fills", ("copy_", "_to_copy", "fill_", "zero_")),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(f in lowered for f in fragments):
            return group
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-seconds", type=float, default=2.0, help="length of each timed matmul window")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or args.image_size < 32 or args.matmul_size < 1 or args.matmul_seconds <= 0:
        parser.error("--steps, --batch and --matmul-size must be at least 1, --image-size at least 32, "
                     "--matmul-seconds above 0")
    bf16 = bf16_native("cpu") if args.precision == "auto" else args.precision == "bf16"
    device = torch.device("cpu")
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; torch {torch.__version__}; "
          f"{'bf16 autocast' if bf16 else 'fp32'}; {args.arch} at {args.image_size} px, batch {args.batch}")

    torch.manual_seed(0)
    model = build_model(args.arch, pretrained=False)
    params = apply_strategy(model, "full")
    model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, **optimizer_options(device))
    x = torch.randn(args.batch, 1, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch,))

    def step() -> None:
        with autocast(device, bf16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    conv_flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    counted_flops = counter.get_total_flops()  # convolutions and the head's matmul
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    step_s = (time.perf_counter() - t0) / args.steps
    gflops = matmul_gflops("cpu", torch.bfloat16 if bf16 else torch.float32, args.matmul_size, args.matmul_seconds)

    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        group = group_of(event.key)
        seconds[group] = seconds.get(group, 0.0) + event.self_cpu_time_total / 1e6 / args.steps
    profiled = sum(seconds.values())
    limit = gflops * 1e9 / (counted_flops / args.batch)
    print(f"\nstep {step_s * 1000:.0f} ms (profiled), {args.batch / step_s:.1f} img/s; matmul "
          f"{gflops:.0f} GFLOP/s -> compute limit {limit:.1f} img/s; this step reaches "
          f"{args.batch / step_s / limit:.0%} of it\n")
    print(f"{'group':24s} {'ms/step':>8s} {'share':>6s}")
    for group, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{group:24s} {s * 1000:8.1f} {s / profiled:6.1%}")
    conv_s = seconds.get("convolution", 0.0) * step_s / profiled  # wall time: the profiler's overhead taken out
    if conv_s > 0:
        conv_rate = conv_flops / conv_s / 1e9
        print(f"\nconvolutions: {conv_flops / 1e9:.1f} GFLOP per step at {conv_rate:.0f} GFLOP/s = "
              f"{conv_rate / gflops:.0%} of the matmul rate (they are {conv_flops / counted_flops:.0%} of the "
              f"counted FLOPs)")
        ceiling = args.batch / conv_s
        print(f"ceiling with every other operator free: {ceiling:.1f} img/s = {ceiling / limit:.0%} of the limit; "
              f"the other operators cost {1 - conv_s / step_s:.0%} of the step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
