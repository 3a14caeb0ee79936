"""Device-check phase ``gpu``: which machine this is (GPU name, memory, clocks; torch, Triton and CUDA
versions), in the phase's result JSON. On a CPU (dry run) it says so."""

from __future__ import annotations

import platform
import shutil
import subprocess

import _results
import torch


def main() -> int:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, memory_GiB=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, no CUDA)"
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version",
                            "--format=csv"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = r.stdout.strip()
    info["table"] = "| " + " | ".join(f"{k}: {v}" for k, v in info.items() if k != "nvidia_smi") + " |"
    print(info)
    _results.write_results(info, "gpu.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
