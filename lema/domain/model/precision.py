"""The dtype a run computes in, from the model file's dtype, the config and the device.

float16 keeps 5 exponent bits: small gradients underflow to zero and large activations
overflow. transformers + peft users train such models with ``torch.autocast`` in bf16, or
fp16 with a ``GradScaler``. With ``dtype="auto"`` a float16 file therefore computes in
bfloat16 where the device computes bf16 natively
(:attr:`lema.domain.device_traits.DeviceTraits.bf16`: CPUs, CUDA compute capability 8.0+),
and keeps float16 elsewhere (pre-Ampere GPUs), with a warning; ``dtype="float16"`` asked for
explicitly is kept, with the same warning. A run that computes in float16 trains with
dynamic loss scaling (:mod:`lema.app.training.loss_scaling`, GradScaler's rules), which
keeps the gradients from underflowing; an activation that overflows still stops the step.
Other files compute in their own dtype.

Example:
    >>> compute_dtype_code("F16", "auto", bf16=True)[0]
    'BF16'
    >>> compute_dtype_code("BF16", "auto", bf16=False)
    ('BF16', None)
"""

from __future__ import annotations

from lema.domain.model.spec import dtype_code

_FP16_RISK = ("float16 runs with dynamic loss scaling, so small gradients do not underflow, but large activations "
              "can overflow")


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
            return code, (f"dtype float16: {_FP16_RISK}; prefer {'bfloat16' if bf16 else 'float32'} for training")
        return code, None
    code = dtype_code(file_dtype)
    if code != "F16":
        return code, None
    if bf16:
        return "BF16", ("the model file is float16: training computes in bfloat16 (its range, with no loss "
                        'scaling needed); set dtype="float16" to keep float16')
    return "F16", (f"the model file is float16 and this device has no native bfloat16: training computes in "
                   f"float16 ({_FP16_RISK}); set dtype=\"float32\" if a step overflows")
