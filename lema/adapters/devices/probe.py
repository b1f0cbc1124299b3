"""Ask the machine how much device memory it has, without importing torch.

``lema plan`` uses this when no ``--vram`` is given. ``nvidia-smi`` answers in tens of
milliseconds; importing torch to ask CUDA would take seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def local_gpu_memory() -> tuple[int, str] | None:
    """``(total_bytes, description)`` of the first visible NVIDIA GPU, or None when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible in ("-1", "none", "NoDevFiles") or (os.environ.get("CUDA_VISIBLE_DEVICES") == ""):
        return None
    query = [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    rows = [r for r in rows if len(r) == 3 and r[2].isdigit()]
    if not rows:
        return None
    chosen = next((r for r in rows if r[0] == visible), rows[0]) if visible.isdigit() else rows[0]
    return int(chosen[2]) * 1024**2, f"GPU {chosen[0]} ({chosen[1]})"
