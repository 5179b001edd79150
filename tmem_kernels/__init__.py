"""tmem_kernels: the ops only (tensors in, tensors out; no transformers, no models).

`reference` is the pure-torch spec of every op. The Triton kernels (`lora_mlp`, `lora_segmented`, `update`,
`rmsnorm_triton`, `addrmsnorm_triton`, `rotary_triton`, `qknorm_rope_triton`, `swiglu_act_triton`), the native CPU
extension (`native`), `rsvd`, `cross_entropy`, `rmsnorm`, `addrmsnorm`, `rotary`, `qknorm_rope`, `swiglu_act` and
`composed_lora_mlp` implement the same signatures and are tested against it. `library` registers them as torch
custom ops (`torch.ops.tmem.*`, table in the README); the functions exported here call those ops.
`get_ops(backend)` gives one backend's op set.
"""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

from tmem_kernels.library import (
    OPS,
    adamw_step_native,
    adamw_step_torch,
    adamw_step_triton,
    add_rms_norm,
    linear_cross_entropy,
    linear_cross_entropy_rows,
    lora_mlp_composed,
    lora_mlp_native,
    lora_mlp_torch,
    lora_mlp_triton,
    qk_norm_rope,
    randomized_svd_lora_init,
    randomized_svd_top_r,
    rms_norm,
    rope,
    sgd_step_native,
    sgd_step_torch,
    sgd_step_triton,
    swiglu,
)
from tmem_kernels.ops import BACKENDS, KernelOps, available, get_ops

__all__ = [
    "BACKENDS",
    "OPS",
    "KernelOps",
    "__version__",
    "add_rms_norm",
    "adamw_step_native",
    "adamw_step_torch",
    "adamw_step_triton",
    "available",
    "get_ops",
    "linear_cross_entropy",
    "linear_cross_entropy_rows",
    "lora_mlp_composed",
    "lora_mlp_native",
    "lora_mlp_torch",
    "lora_mlp_triton",
    "qk_norm_rope",
    "randomized_svd_lora_init",
    "randomized_svd_top_r",
    "rms_norm",
    "rope",
    "sgd_step_native",
    "sgd_step_torch",
    "sgd_step_triton",
    "swiglu",
]
