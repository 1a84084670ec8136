"""The LM head and the cross-entropy fused: ``cross_entropy(hidden @ weight.T + bias, target)``
without ever holding the (tokens x vocab) logits.

The tokens are processed in chunks. For each chunk: the logits (matmul in the input dtype,
fp32 accumulation), then the cross-entropy kernel writes the loss and, in place over that
chunk's logits, their gradient; from it the chunk's ``grad_hidden`` (a matmul into its rows)
and the fp32 ``grad_weight`` / ``grad_bias`` accumulators. All this happens in the FORWARD,
so the backward only scales the stored gradients by ``grad_output``: the extra memory at the
peak is the fp32 weight-gradient accumulator (vocab x dim) and one chunk of logits (plus, for
bf16/fp16 weights, one vocab slice of the weight gradient of the same size), not the full
logits and their fp32 softmax.

Chunk size (``chunk_size=None``): ``ceil(tokens / ceil(vocab / dim))`` tokens, so one chunk of
logits holds about as many elements as ``hidden`` itself, but at least 256 tokens (matmuls
thinner than that run far below peak) and at most all of them. Any positive ``chunk_size``
overrides it; it need not divide the token count. The trade-off: every chunk reads and
writes the whole fp32 weight-gradient accumulator (vocab x dim) once, so fewer, larger
chunks cost less time and more memory.

``reduction="none"`` cannot pre-scale: each row's ``grad_output`` is only known in the
backward. Then the forward computes the losses only, and the backward recomputes the chunks
with each row's gradient scaled by its ``grad_output`` (the matmuls run twice).

The matmuls are ``fastlm.ops.gemm``'s (cuBLAS on CUDA, oneDNN on CPU); the cross-entropy part
dispatches to the backend chosen for ``cross_entropy_fwd`` (Triton, C++ or PyTorch).
"""

import torch
import torch.nn.functional as F

from fastlm import alloc, backend, eager
from fastlm.ops.cross_entropy import (
    SUPPORTED_DTYPES,
    check_loss_options,
    check_num_items,
    check_target,
    check_targets,
    cross_entropy_ref,
    forbid_double_backward,
    loss_fake,
    loss_scale,
    reduce_loss,
    scaled_gradient,
    split_num_items,
)
from fastlm.ops.gemm import addmm_, mm

MIN_CHUNK = 256


def default_chunk_size(tokens: int, vocab: int, dim: int) -> int:
    """Tokens per chunk: a chunk's logits ~ the size of hidden, at least MIN_CHUNK tokens."""
    chunks = -(-vocab // dim)
    return max(1, min(tokens, max(MIN_CHUNK, -(-tokens // chunks))))


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (fp32, vocab x dim) += grad_logits.T @ hidden.

    fp32 inputs accumulate straight into grad_weight. Low-precision ones cannot (a matmul's
    output has its inputs' dtype), so the product goes through a temporary in their dtype,
    one vocab slice at a time, each slice no larger than the chunk of logits.
    """
    if grad_logits.dtype == torch.float32:
        addmm_(grad_weight, grad_logits.t(), hidden)
        return
    rows, vocab = grad_logits.shape
    step = max(1, min(vocab, rows * vocab // hidden.shape[1]))
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        grad_weight[start:stop] += mm(grad_logits[:, start:stop].t(), hidden)


def _chunked_pass(hidden, weight, bias, target, scale, row_scale, row_losses, grad_hidden, grad_weight, grad_bias,
                  ignore_index, label_smoothing, z_loss, chunk_size):
    """Loss of every row into row_losses; the gradients asked for (tensors, not None) accumulated.

    ``scale``: the factor on each row's gradient, 1 element, or one per row when row_scale.
    """
    ce = backend.select("cross_entropy_fwd", hidden.device)
    need_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
    tokens = hidden.shape[0]
    for start in range(0, tokens, chunk_size):
        stop = min(start + chunk_size, tokens)
        h = hidden[start:stop]
        logits = mm(h, weight.t(), bias)
        # The logits are ours alone: their gradient overwrites them (no second buffer).
        ce(
            logits, target[start:stop], scale[start:stop] if row_scale else scale, row_losses[start:stop],
            logits if need_grad else None, ignore_index, label_smoothing, z_loss, row_scale,
        )
        if grad_hidden is not None:
            mm(logits, weight, out=grad_hidden[start:stop])
        if grad_weight is not None:
            _accumulate_weight_grad(grad_weight, logits, h)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)


def _grad_buffers(hidden, weight, has_bias, needs):
    need_hidden, need_weight, need_bias = needs
    tokens, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = alloc.empty_like(hidden) if need_hidden and tokens > 0 else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias and has_bias else None
    return grad_hidden, grad_weight, grad_bias


def _or_empty(t, like, dtype=None):
    return t if t is not None else like.new_empty(0, dtype=dtype)


# ----------------------------------------------------------------------------- torch.library ops


@eager.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    num_items: torch.Tensor | None, num_items_int: int, ignore_index: int, reduction: str,
    label_smoothing: float, z_loss: float, chunk_size: int,
    need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (tokens, dim) -> (loss, grad_hidden, grad_weight fp32, grad_bias fp32).

    The gradients are those of the loss, computed here for mean/sum; empty when not asked
    for, and always for reduction="none" (its backward recomputes them).
    """
    tokens = hidden.shape[0]
    vocab = weight.shape[0]
    check_targets("linear_cross_entropy", target, vocab, ignore_index)
    check_num_items("linear_cross_entropy", target, ignore_index, reduction, num_items, num_items_int)
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    scale = loss_scale(target, ignore_index, reduction, num_items, num_items_int)
    row_losses = alloc.empty(tokens, dtype=torch.float32, device=hidden.device)
    needs = (need_grad_hidden, need_grad_weight, need_grad_bias) if reduction != "none" else (False, False, False)
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, bias is not None, needs)
    if tokens > 0:
        _chunked_pass(hidden, weight, bias, target, scale, False, row_losses, grad_hidden, grad_weight, grad_bias,
                      ignore_index, label_smoothing, z_loss, chunk_size)
    if need_grad_hidden and grad_hidden is None and reduction != "none":
        grad_hidden = hidden.new_empty(hidden.shape)  # tokens == 0: nothing to write
    return (
        reduce_loss(row_losses, scale, reduction),
        _or_empty(grad_hidden, hidden),
        _or_empty(grad_weight, hidden, torch.float32),
        _or_empty(grad_bias, hidden, torch.float32),
    )


@_linear_cross_entropy_fwd_op.register_fake
def _(hidden, weight, bias, target, num_items, num_items_int, ignore_index, reduction, label_smoothing, z_loss,
      chunk_size, need_grad_hidden, need_grad_weight, need_grad_bias):
    stored = reduction != "none"
    # new_empty, not empty_like: the gradients are contiguous whatever the inputs' strides.
    grad_hidden = hidden.new_empty(hidden.shape) if stored and need_grad_hidden else hidden.new_empty(0)
    grad_weight = (
        weight.new_empty(weight.shape, dtype=torch.float32) if stored and need_grad_weight
        else hidden.new_empty(0, dtype=torch.float32)
    )
    has_bias = stored and need_grad_bias and bias is not None
    grad_bias = hidden.new_empty(weight.shape[0] if has_bias else 0, dtype=torch.float32)
    return loss_fake(hidden.shape[0], reduction, hidden), grad_hidden, grad_weight, grad_bias


@eager.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd_op(
    grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, chunk_size: int,
    need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of reduction="none": recompute the chunks, each row's gradient scaled by grad_loss[row]."""
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    grad_hidden, grad_weight, grad_bias = _grad_buffers(
        hidden, weight, bias is not None, (need_grad_hidden, need_grad_weight, need_grad_bias)
    )
    tokens = hidden.shape[0]
    if tokens > 0:
        scratch = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        _chunked_pass(hidden, weight, bias, target, grad_loss.float().contiguous(), True, scratch, grad_hidden,
                      grad_weight, grad_bias, ignore_index, label_smoothing, z_loss, chunk_size)
    elif need_grad_hidden:
        grad_hidden = hidden.new_empty(hidden.shape)
    return (
        _or_empty(grad_hidden, hidden),
        _or_empty(grad_weight, hidden, torch.float32),
        _or_empty(grad_bias, hidden, torch.float32),
    )


@_linear_cross_entropy_bwd_op.register_fake
def _(grad_loss, hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, chunk_size,
      need_grad_hidden, need_grad_weight, need_grad_bias):
    grad_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(0)  # contiguous
    grad_weight = weight.new_empty(weight.shape if need_grad_weight else 0, dtype=torch.float32)
    has_bias = need_grad_bias and bias is not None
    grad_bias = hidden.new_empty(weight.shape[0] if has_bias else 0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, _, _, ignore_index, reduction, label_smoothing, z_loss, chunk_size,
     need_hidden, need_weight, need_bias) = inputs
    ctx.reduction = reduction
    ctx.needs = (need_hidden, need_weight, need_bias and bias is not None)
    # The stored gradients are outputs that never receive one: without this autograd would pass zeros
    # tensors of their sizes (an fp32 copy of the weight's size in the backward).
    ctx.set_materialize_grads(False)
    ctx.options = (ignore_index, label_smoothing, z_loss, chunk_size)
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, *_grads_of_stored):
    # The stored gradients are outputs only to be saved: their cotangents are not propagated (see
    # cross_entropy's backward), and the gradients returned here may not be differentiated in turn.
    need_hidden, need_weight, need_bias = ctx.needs
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_bwd_op(
            grad_loss, hidden, weight, bias, target, *ctx.options, need_hidden, need_weight, need_bias
        )
    else:
        stored_hidden, stored_weight, stored_bias = ctx.saved_tensors
        grad_hidden = scaled_gradient(stored_hidden, grad_loss, stored_hidden.dtype) if need_hidden else None
        grad_weight = scaled_gradient(stored_weight, grad_loss, ctx.weight_dtype) if need_weight else None
        grad_bias = scaled_gradient(stored_bias, grad_loss, ctx.bias_dtype) if need_bias else None
    return forbid_double_backward(
        "linear_cross_entropy",
        grad_hidden if need_hidden else None,
        grad_weight.to(ctx.weight_dtype) if need_weight else None,
        grad_bias.to(ctx.bias_dtype) if need_bias else None,
    ) + (None,) * 11


_linear_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _check_param(fn, name, t, shape, hidden) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != hidden.dtype:
        raise TypeError(f"{fn}: {name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != hidden.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but hidden is on {hidden.device}")


def linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, num_items=None, chunk_size=None):
    """``cross_entropy(hidden @ weight.T + bias, target, ...)`` without materializing the logits.

    hidden (..., dim), weight (vocab, dim), bias (vocab,) or None, target (...) int64/int32.
    The options are ``fastlm.cross_entropy``'s (``num_items``: the global target-token count
    for gradient accumulation, checked as there). ``chunk_size``: tokens per chunk (see the module
    docstring for the default rule). Gradients flow to hidden, weight and bias; the loss is fp32. Under
    autocast, hidden, weight and bias are cast to the autocast dtype, as ``F.linear``'s are.
    """
    fn = "linear_cross_entropy"
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{fn}: hidden must be a torch.Tensor, got {type(hidden).__name__}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and isinstance(weight, torch.Tensor):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(
                hidden.to(dtype), weight.to(dtype), target, bias.to(dtype) if bias is not None else None,
                ignore_index, reduction, label_smoothing, z_loss, num_items, chunk_size,
            )
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"{fn}: hidden must be (tokens, dim) or (..., dim), got shape {tuple(hidden.shape)}")
    dim = hidden.shape[-1]
    if dim < 1:
        raise ValueError(f"{fn}: the last dim of hidden must be >= 1, got shape {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != dim or weight.shape[0] < 1:
        raise ValueError(f"{fn}: weight must have shape (vocab, {dim}) with vocab >= 1, got {tuple(weight.shape)}")
    vocab = weight.shape[0]
    _check_param(fn, "weight", weight, (vocab, dim), hidden)
    if bias is not None:
        _check_param(fn, "bias", bias, (vocab,), hidden)
    check_target(fn, target, hidden.shape[:-1], hidden.device, "hidden.shape[:-1]")
    check_loss_options(fn, reduction, label_smoothing, z_loss, ignore_index, num_items, hidden.device)
    tokens = hidden.numel() // dim
    if chunk_size is None:
        chunk_size = default_chunk_size(tokens, vocab, dim)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{fn}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
    elif chunk_size <= 0:
        raise ValueError(f"{fn}: chunk_size must be > 0, got {chunk_size}")
    items, items_int = split_num_items(num_items)
    grad_on = torch.is_grad_enabled()
    loss, _, _, _ = _linear_cross_entropy_fwd_op(
        hidden.reshape(tokens, dim), weight, bias, target.reshape(tokens), items, items_int, ignore_index,
        reduction, float(label_smoothing), float(z_loss), chunk_size,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return loss.reshape(target.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------- reference


def linear_cross_entropy_ref(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0, z_loss=0.0, num_items=None, chunk_size=None):
    """PyTorch reference: ``F.linear`` then ``cross_entropy_ref`` (``chunk_size`` is accepted and unused)."""
    return cross_entropy_ref(F.linear(hidden, weight, bias), target, ignore_index, reduction, label_smoothing,
                             z_loss, num_items)
