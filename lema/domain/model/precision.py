"""The dtype a run computes in, from the model file's dtype, the config and the device.

LEMA trains without loss scaling, so a float16 model trained in float16 lets small
gradients underflow to zero (and large activations overflow): transformers + peft users
train such models with ``torch.autocast`` in bf16, or fp16 with a ``GradScaler``. With
``dtype="auto"`` a float16 file therefore computes in bfloat16 where the device computes
bf16 natively (:attr:`lema.domain.device_traits.DeviceTraits.bf16`: CPUs, CUDA compute
capability 8.0+), and keeps float16 with a warning elsewhere; ``dtype="float16"`` asked for
explicitly is kept, with the same warning. Other files compute in their own dtype.

Example:
    >>> compute_dtype_code("F16", "auto", bf16=True)[0]
    'BF16'
    >>> compute_dtype_code("BF16", "auto", bf16=False)
    ('BF16', None)
"""

from __future__ import annotations

from lema.domain.model.spec import dtype_code

_FP16_RISK = "float16 without loss scaling lets small gradients underflow"


def compute_dtype_code(file_dtype: str, requested: str, *, bf16: bool) -> tuple[str, str | None]:
    """``(dtype code, warning or None)`` of a run.

    Args:
        file_dtype: the model file's dtype code (``"F16"``).
        requested: the config's ``dtype`` (``"auto"``, ``"float16"``, ...).
        bf16: the device computes bfloat16 natively.
    """
    if requested != "auto":
        code = dtype_code(requested)
        if code == "F16":
            return code, (f"dtype float16: {_FP16_RISK} (LEMA has no loss scaling); "
                          f"prefer {'bfloat16' if bf16 else 'float32'} for training")
        return code, None
    code = dtype_code(file_dtype)
    if code != "F16":
        return code, None
    if bf16:
        return "BF16", (f"the model file is float16: training computes in bfloat16 ({_FP16_RISK}); "
                        'set dtype="float16" to keep float16')
    return "F16", (f"the model file is float16 and this device has no native bfloat16: training computes in "
                   f"float16 ({_FP16_RISK}; LEMA has no loss scaling); set dtype=\"float32\" for safe gradients")
