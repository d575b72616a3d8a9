"""The fused LoRA node: forward and backward of y = x W^T + b + s (x A^T) B^T written out by hand, for the
common training case of a frozen base (lora.py uses it when `LoraLayer.fusable` says so; `fused = False`
switches it off). It computes the same equation as lora.py's plain path; tests/test_lora.py holds them equal.
"""

import torch
import torch.nn as nn


class FrozenLinearWithLora(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W and b frozen, the backward written out by hand.

    When x, W, A and B share a dtype the forward runs the equation's own operations, so outputs equal the
    plain path (and peft) bit for bit; gradients agree up to float summation order (tests/test_lora.py,
    tests/reference/). The backward is where the time goes on CPU: the rank-r products are memory-bound
    and cost far more than their FLOPs.
      - The input gradient g W + (s g B) A is accumulated in one buffer instead of autograd adding two.
      - grad B = s g^T h is computed as (h^T g)^T: on our 2-core CPU (MKL) the (out, N) @ (N, r) form that
        autograd picks runs about 3x slower than (r, N) @ (N, out) on the same numbers.
      - s g B uses B^T stored row-major (r, out): (N, out) @ (out, r) with a row-major right factor runs
        about 2.5x slower than with its transpose view.

    Half-precision base (x and W in fp16/bf16) with fp32 adapters, the usual way to train on a GPU: the
    update runs in x's precision with A and B rounded to it, as autocast would run it, and is added to the
    base output inside one GEMM (`addmm`), so the sum is rounded once. peft instead upcasts x and adds in
    fp32, which costs several fp32 passes over (tokens x out) activations: on an H100, bf16 llama-1b with
    all seven projections adapted, a training step takes 0.78 of peft's. The two differ by rounding; the
    tests hold the node's error against float64 within twice peft's (outputs and the gradients of A and B,
    which come back in fp32 with a half-precision matmul's accuracy, a few 1e-3 relative).
    bench/lora_step.py measures the whole step against peft and the frozen base.

    `weight` may also be a function that returns it: a 4-bit base (qlora.py) dequantises in the forward and
    again in the backward, so no (out x in) tensor is kept in between.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        ctx.weight_fn = weight if callable(weight) else None
        if ctx.weight_fn is not None:
            weight = ctx.weight_fn()
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # no copy unless the adapters are fp32 on a half base
        h = nn.functional.linear(x2, A)  # (N, r)
        y = nn.functional.linear(x2, weight, bias)  # (N, out)
        if A is lora_A:
            y += nn.functional.linear(h, B).mul_(scaling)  # the equation's own operations, so equal bits
        else:
            y.addmm_(h, B.t(), alpha=scaling)  # half precision: y + s h B^T rounded once
        ctx.save_for_backward(x2, None if ctx.weight_fn else weight, A, B, h)
        ctx.scaling, ctx.adapter_dtype = scaling, lora_A.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2, weight, A, B, h = ctx.saved_tensors
        B_rows = B.t().contiguous()  # (r, out): small, and the faster layout for the GEMM below
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        g_h = (g @ B_rows.t()).mul_(ctx.scaling)  # dL/dh = s * g B, (N, r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight_fn() if ctx.weight_fn else weight
            grad_x = (g_h @ A).addmm_(g, weight).view(*grad.shape[:-1], x2.shape[-1])  # g W + g_h A
        if ctx.needs_input_grad[3]:
            grad_A = (g_h.t() @ x2).to(ctx.adapter_dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_B = (h.t() @ g).t().contiguous().to(ctx.adapter_dtype).mul_(ctx.scaling)  # s g^T h, as (h^T g)^T
        return grad_x, None, None, grad_A, grad_B, None
