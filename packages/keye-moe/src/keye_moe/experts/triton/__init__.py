"""Triton grouped-GEMM experts with the token gather and scatter fused into the GEMMs.

``kernels.py`` holds the three kernels, ``plan.py`` the padded dispatch they read, ``function.py`` the
autograd.Function whose forward and backward are both Triton-backed. The loop backend
(``keye_moe.experts.loop``) is the reference the tests compare against.
"""

from keye_moe.experts.triton.function import TritonExperts, triton_experts

__all__ = ["TritonExperts", "triton_experts"]
