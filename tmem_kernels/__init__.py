"""tmem_kernels: the ops only (tensors in, tensors out; no transformers, no models).

`reference` is the pure-torch spec of every op. The Triton kernels (`lora_mlp`, `lora_segmented`,
`update`, `rsvd`) and the native CPU extension (`native`) implement the same signatures and are tested
against it.
"""
