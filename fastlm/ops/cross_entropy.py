"""Cross-entropy over the last dim of the logits, loss and gradient in one pass.

Per row with target ``t`` (not ``ignore_index``), label smoothing ``ls`` and z-loss weight ``z``:

    lse  = logsumexp(x)
    loss = lse - (1 - ls) * x[t] - ls * mean(x) + z * lse**2
    dloss/dx[i] = softmax(x)[i] * (1 + 2 * z * lse) - ls / V - (1 - ls) * [i == t]

which is torch's ``F.cross_entropy(..., label_smoothing=ls)`` plus PaLM's z-loss. Ignored rows
have loss 0 and gradient 0. Math is fp32 whatever the logits' dtype; the loss is returned in
fp32 (a sum over many rows), the gradient in the logits' dtype.

One pass (Liger-Kernel's idea): the forward kernel computes each row's loss AND writes the
gradient of the reduced loss into a buffer the size of the logits, so the backward only
scales that buffer by ``grad_output``. The forward never saves the logits, so once the
caller drops them their memory goes back; the buffer is a separate allocation because
overwriting the logits in place would corrupt them for anyone else who holds them (a
retained graph, a second loss, the user). ``linear_cross_entropy`` owns its logits and does
overwrite them. With ``reduction="none"`` the buffer holds the unscaled per-row gradient and
the backward scales each row by its ``grad_output``.

Targets are range-checked before any kernel launches: one reduction over ``target`` (tokens
integers, negligible next to the logits) and one device-to-host sync per call, so that an
out-of-range target is a ``ValueError``, never a silent NaN or an out-of-bounds read.

The Triton kernel runs one program per row (several rows for small vocabularies) and loops
over the vocabulary in blocks of at most ``MAX_BLOCK_V`` with an online logsumexp, so any
vocabulary size works (256k and more).
"""

import torch

from fastlm import alloc, backend, eager
from fastlm._triton import tl, triton
from fastlm.extension import cpu_extension
from fastlm.kernel_registry import Variant, register_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")
# Vocabulary columns one Triton program holds at once; longer rows loop over blocks.
MAX_BLOCK_V = 4096
MAX_BLOCK_M = 128


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS, TARGET, SCALE, LOSS, GRAD,
    n_rows, V, stride_logits, stride_grad, ignore_index, label_smoothing, z_loss,
    HAS_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # BLOCK_M rows per program (several only for small vocabularies). Pass 1: online max,
    # sum of exp and sum of logits over vocab blocks. Pass 2 (HAS_GRAD): re-read the rows and
    # write the scaled gradient. GRAD may be LOGITS itself: each element is read before it is
    # overwritten, by the same program. Ignored rows load nothing (masked) and get zeros.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    target = tl.load(TARGET + rows, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (target != ignore_index)
    x_rows = LOGITS + rows.to(tl.int64)[:, None] * stride_logits
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = valid[:, None] & (c[None, :] < V)
        x = tl.load(x_rows + c[None, :], mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # A block of -inf logits (masked vocabulary, or an ignored row) must not turn
        # exp(m - m_new) into NaN.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        sum_x += tl.sum(tl.where(mask, x, 0.0), axis=1)
        m = m_new
    # d sums exp(x - m_safe); recomputed as a value set in the loop body is not visible here.
    m_safe = tl.where(m == -float("inf"), 0.0, m)
    log_d = tl.log(tl.where(valid, d, 1.0))
    lse = m_safe + log_d
    x_t = tl.load(LOGITS + rows.to(tl.int64) * stride_logits + target, mask=valid, other=0.0).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * x_t + z_loss * lse * lse
    if label_smoothing != 0.0:
        # Guarded: 0 * sum_x would be NaN for a row with -inf logits.
        loss -= label_smoothing * sum_x / V
    tl.store(LOSS + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    if HAS_GRAD:
        if ROW_SCALE:
            scale = tl.load(SCALE + rows, mask=row_ok, other=0.0)
        else:
            scale = tl.load(SCALE)
        coef = tl.where(valid, scale, 0.0)
        p_coef = (1.0 + 2.0 * z_loss * lse) * coef
        smooth = label_smoothing / V * coef
        hit = (1.0 - label_smoothing) * coef
        g_rows = GRAD + rows.to(tl.int64)[:, None] * stride_grad
        for start in range(0, V, BLOCK_V):
            c = start + cols
            col_ok = c[None, :] < V
            x = tl.load(x_rows + c[None, :], mask=valid[:, None] & col_ok, other=-float("inf")).to(tl.float32)
            # exp((x - m) - log d), not exp(x - lse): lse's rounding (half an ulp of a value
            # ~10) would otherwise land, relative, on every probability.
            g = tl.exp((x - m_safe[:, None]) - log_d[:, None]) * p_coef[:, None] - smooth[:, None]
            g = tl.where(c[None, :] == target[:, None], g - hit[:, None], g)
            tl.store(g_rows + c[None, :], g.to(GRAD.dtype.element_ty), mask=row_ok[:, None] & col_ok)


def _fwd_config(vocab: int) -> dict:
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    # Small vocabularies: several rows per program so each program still moves ~4k elements,
    # but at most MAX_BLOCK_M rows (each row's statistics live in registers).
    block_m = max(1, min(MAX_BLOCK_V // block_v, MAX_BLOCK_M))
    return dict(BLOCK_M=block_m, BLOCK_V=block_v, num_warps=8 if block_m * block_v >= 2048 else 4)


_TRITON_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _fwd_variants():
    """Every dtype / target dtype / gradient mode at the block configs of a small, a mid and a
    large vocabulary, the large one both odd (GPT-2's 50257) and a multiple of 16 (Llama 3's
    128256, where Triton vectorizes the row loads)."""
    for vocab in (2, 1000, 50257, 128256):
        cfg = _fwd_config(vocab)
        even = ("V", "stride_logits") if vocab % 16 == 0 else ()
        for dtype, ptr in _TRITON_TYPES.items():
            for target in ("*i64", "*i32"):
                for has_grad, row_scale in ((False, False), (True, False), (True, True)):
                    signature = {
                        "LOGITS": ptr, "TARGET": target, "SCALE": "*fp32", "LOSS": "*fp32",
                        "n_rows": "i32", "V": "i32", "stride_logits": "i32", "stride_grad": "i32",
                        "ignore_index": "i32", "label_smoothing": "fp32", "z_loss": "fp32",
                    }
                    constexprs = dict(
                        HAS_GRAD=has_grad, ROW_SCALE=row_scale, BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"]
                    )
                    if has_grad:
                        signature["GRAD"] = ptr
                    else:
                        constexprs["GRAD"] = None
                    mode = "row-scaled grad" if row_scale else "grad" if has_grad else "loss only"
                    # Without a gradient the launcher passes stride_grad = 0, a multiple of 16.
                    grad_even = ("stride_grad",) if even or not has_grad else ()
                    yield Variant(
                        signature, constexprs, num_warps=cfg["num_warps"], divisible_by_16=even + grad_even,
                        label=f"{str(dtype).removeprefix('torch.')} {target[1:]} V={vocab} {mode}",
                    )


register_kernel(_cross_entropy_fwd_kernel, variants=_fwd_variants)


# ----------------------------------------------------------------------------- launchers


def _fwd_triton(logits, target, scale, loss, grad, ignore_index, label_smoothing, z_loss, row_scale):
    rows, vocab = logits.shape
    cfg = _fwd_config(vocab)
    _cross_entropy_fwd_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
        logits, target, scale, loss, grad,
        rows, vocab, logits.stride(0), grad.stride(0) if grad is not None else 0, ignore_index,
        label_smoothing, z_loss,
        HAS_GRAD=grad is not None, ROW_SCALE=row_scale, **cfg,
    )


def _fwd_cpp(logits, target, scale, loss, grad, ignore_index, label_smoothing, z_loss, row_scale):
    cpu_extension().cross_entropy_fwd(
        logits, target.to(torch.int64), scale, loss, grad, ignore_index, label_smoothing, z_loss, row_scale
    )


def _fwd_torch(logits, target, scale, loss, grad, ignore_index, label_smoothing, z_loss, row_scale):
    x = logits.float()
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0).long()
    rows, lse = _row_losses(x, safe_target, valid, label_smoothing, z_loss)
    loss.copy_(rows)
    if grad is not None:
        coef = torch.where(valid, scale if row_scale else scale.expand_as(lse), 0.0)
        g = torch.softmax(x, dim=-1) * ((1.0 + 2.0 * z_loss * lse) * coef)[:, None]
        g -= (label_smoothing / x.shape[1] * coef)[:, None]
        g.scatter_add_(1, safe_target[:, None], (-(1.0 - label_smoothing) * coef)[:, None])
        grad.copy_(g)


backend.register("cross_entropy_fwd", triton=_fwd_triton, cpp=_fwd_cpp, torch=_fwd_torch)


# ----------------------------------------------------------------------------- shared by the ops


def check_targets(fn: str, target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError if a target is outside [0, vocab) and not ignore_index (one reduction, one sync)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: target values must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"got {int(target[first])} at flat position {first}"
        )


def check_num_items(fn: str, target, ignore_index, reduction, num_items, num_items_int) -> None:
    """ValueError if the mean's count is below 1 while some target is not ignored: ``loss_scale``'s clamp
    would silently make the mean a sum. 0 is allowed for an all-ignored batch (loss 0). An int or a CPU
    tensor is read; a tensor on another device is not (that would synchronize it), so its clamp stands.
    Run in the ops, on real tensors: under torch.compile the count is only known there."""
    if reduction != "mean":
        return
    if num_items is not None:
        if num_items.device.type != "cpu":
            return
        count = num_items.item()
    elif num_items_int >= 0:
        count = num_items_int
    else:
        return
    # The reduction over the targets (a device sync) runs only for a count below 1, which is rare.
    if count < 0 or (count < 1 and bool((target != ignore_index).any())):
        raise ValueError(
            f"{fn}: num_items (the mean's denominator) must be >= 1, or 0 when every target is ignored; got {count}"
        )


def loss_scale(target, ignore_index, reduction, num_items, num_items_int) -> torch.Tensor:
    """The factor on each row's gradient, as a 1-element fp32 tensor on target's device (no sync).

    mean: 1 / max(count, 1), count being ``num_items`` when given (the global number of target
    tokens over gradient-accumulation steps) or the local number of non-ignored targets; the
    max makes an all-ignored batch a 0 loss with 0 gradient. sum and none: 1.
    """
    device = target.device
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=device)
    if num_items is not None:
        count = num_items.to(device=device, dtype=torch.float32).reshape(1)
    elif num_items_int >= 0:
        count = torch.full((1,), float(num_items_int), dtype=torch.float32, device=device)
    else:
        count = (target != ignore_index).sum().to(torch.float32).reshape(1)
    return 1.0 / count.clamp_min(1.0)


def _graph_retained() -> bool:
    """Whether the running backward keeps its graph (``retain_graph``/``create_graph``); True where this
    torch does not say (a private function, AOTAutograd's own source of the same fact)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def scaled_gradient(stored: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient a forward stored, times the scalar ``grad_loss``, in ``dtype``.

    ``stored`` is never modified while the graph holds it: a retained graph may run the backward again.
    An fp32 accumulator of a bf16/fp16 weight is cast first and the cast scaled in place, so no fp32
    temporary the size of the weight is made. When ``grad_loss`` is exactly 1 (``loss.backward()`` on the
    loss itself) on the CPU in eager mode and the graph is not retained (so this backward is the last
    user of ``stored``), the product would only copy ``stored``: it is returned as it is (or its cast).
    On a GPU reading that value would synchronize the device, so the product is always taken there.
    """
    one = (
        grad_loss.device.type == "cpu"
        and eager.is_concrete(grad_loss)
        and not _graph_retained()
        and bool(grad_loss == 1)
    )
    if stored.dtype == dtype:
        return stored if one else stored * grad_loss.to(dtype)
    cast = stored.to(dtype)
    return cast if one else cast.mul_(grad_loss.to(dtype))


def reduce_loss(rows: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row fp32 losses -> the op's loss; summed in a fixed order (deterministic)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total * scale[0] if reduction == "mean" else total


def loss_fake(rows: int, reduction: str, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(rows if reduction == "none" else (), dtype=torch.float32)


# ----------------------------------------------------------------------------- torch.library ops


@eager.custom_op("fastlm::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(
    logits: torch.Tensor, target: torch.Tensor, num_items: torch.Tensor | None, num_items_int: int,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (rows, V), target (rows,) -> (loss, grad); grad is the gradient of the loss
    (per row for reduction="none") in logits' dtype, empty unless compute_grad."""
    rows, vocab = logits.shape
    check_targets("cross_entropy", target, vocab, ignore_index)
    check_num_items("cross_entropy", target, ignore_index, reduction, num_items, num_items_int)
    logits = logits.contiguous()
    target = target.contiguous()
    scale = loss_scale(target, ignore_index, reduction, num_items, num_items_int)
    row_losses = alloc.empty(rows, dtype=torch.float32, device=logits.device)
    grad = alloc.empty_like(logits) if compute_grad else None
    if rows > 0:
        backend.select("cross_entropy_fwd", logits.device)(
            logits, target, scale, row_losses, grad, ignore_index, label_smoothing, z_loss, False
        )
    loss = reduce_loss(row_losses, scale, reduction)
    return loss, grad if grad is not None else logits.new_empty(0)


@_cross_entropy_fwd_op.register_fake
def _(logits, target, num_items, num_items_int, ignore_index, reduction, label_smoothing, z_loss, compute_grad):
    # new_empty, not empty_like: the stored gradient is contiguous whatever the logits' strides.
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return loss_fake(logits.shape[0], reduction, logits), grad


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.save_for_backward(output[1])
    # The second output (the stored gradient) never receives one: without this autograd would pass a
    # zeros tensor the size of the logits.
    ctx.set_materialize_grads(False)


class _GradientOfGradient(torch.autograd.Function):
    """The identity on a gradient that a backward returned; differentiating it raises (see
    ``forbid_double_backward``)."""

    @staticmethod
    def forward(ctx, grad, fn):
        ctx.fn = fn
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            f"{ctx.fn}: double backward (differentiating its gradient, built with create_graph=True) is not supported"
        )


def forbid_double_backward(fn: str, *grads):
    """The input gradients a backward returns, made to raise if they are differentiated in turn.

    They are scaled from gradients the forward stored; their own derivative (the Hessian) would need the
    logits, which are not kept. When the backward builds a graph (``create_graph=True``) they depend on
    the stored gradients, outputs of the op whose cotangents the backward does not propagate: without
    this a double backward would give a wrong result. (``torch.autograd.function.once_differentiable``
    raises only where the incoming gradient itself requires a gradient, which a loss's seldom does.)
    """
    if not torch.is_grad_enabled():
        return grads
    return tuple(None if g is None else _GradientOfGradient.apply(g, fn) for g in grads)


def _backward(ctx, grad_loss, _grad_of_stored):
    # The stored gradient is an output only to be saved: public calls never use it, and a cotangent for
    # it (torch.library.opcheck gives every output one) is not propagated.
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad.dim() == 1:
        raise RuntimeError("cross_entropy: the forward ran without compute_grad; call it through fastlm.cross_entropy")
    if ctx.reduction == "none":
        dlogits = grad * grad_loss.to(grad.dtype)[:, None]
    else:
        dlogits = scaled_gradient(grad, grad_loss, grad.dtype)
    return forbid_double_backward("cross_entropy", dlogits) + (None,) * 8


_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def check_loss_options(fn, reduction, label_smoothing, z_loss, ignore_index, num_items, device) -> None:
    """Checks shared with linear_cross_entropy; TypeError/ValueError naming the argument."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{fn}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and z_loss >= 0.0):
        raise ValueError(f"{fn}: z_loss must be a non-negative number, got {z_loss!r}")
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(
            f"{fn}: num_items replaces the mean's denominator; it needs reduction='mean', got {reduction!r}"
        )
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0:
            raise ValueError(f"{fn}: num_items must be an int or a 0-d tensor, got shape {tuple(num_items.shape)}")
        if num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise TypeError(f"{fn}: num_items must be an integer or float tensor, got {num_items.dtype}")
        if num_items.device != device and num_items.device.type != "cpu":
            raise ValueError(f"{fn}: num_items is on {num_items.device} but the inputs are on {device}")
    elif isinstance(num_items, bool) or not isinstance(num_items, int):
        raise TypeError(f"{fn}: num_items must be an int, a 0-d tensor or None, got {type(num_items).__name__}")
    elif num_items < 0:
        raise ValueError(f"{fn}: num_items must be >= 0, got {num_items}")


def check_target(fn, target, expected_shape, device, what) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"{fn}: target must be int64 or int32, got {target.dtype}")
    if tuple(target.shape) != tuple(expected_shape):
        raise ValueError(
            f"{fn}: target must have shape {tuple(expected_shape)} ({what}), got {tuple(target.shape)}"
        )
    if target.device != device:
        raise ValueError(f"{fn}: target is on {target.device} but the inputs are on {device}")


def split_num_items(num_items) -> tuple[torch.Tensor | None, int]:
    """num_items as the ops take it: (0-d tensor or None, int or -1 when absent)."""
    if isinstance(num_items, torch.Tensor):
        return num_items, -1
    return None, -1 if num_items is None else num_items


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  num_items=None):
    """Cross-entropy of ``logits`` (..., vocab) against class indices ``target`` (...).

    The class dim is the LAST one (unlike ``F.cross_entropy`` on 3-D input); leading dims are
    flattened. ``reduction``: "mean" (over non-ignored targets, or over ``num_items`` when given:
    pass the global number of target tokens of all gradient-accumulation micro-batches, so the
    micro-batch losses add up to the big batch's mean), "sum" or "none" (per-token losses,
    target's shape). ``z_loss`` adds ``z_loss * logsumexp(logits)**2`` per non-ignored token.
    An all-ignored batch has loss 0 and gradient 0. The loss is fp32.

    ``num_items`` (an int or a 0-d tensor) must be >= 1, or 0 when every target is ignored; below
    that it is a ValueError when it is an int or a CPU tensor. A CUDA tensor is not read (that would
    synchronize the device): there a value below 1 counts as 1.
    """
    fn = "cross_entropy"
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{fn}: logits must be (tokens, vocab) or (..., vocab), got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"{fn}: the vocab (last) dim of logits must be >= 1, got shape {tuple(logits.shape)}")
    check_target(fn, target, logits.shape[:-1], logits.device, "logits.shape[:-1]")
    check_loss_options(fn, reduction, label_smoothing, z_loss, ignore_index, num_items, logits.device)
    items, items_int = split_num_items(num_items)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _cross_entropy_fwd_op(
        logits.reshape(-1, vocab), target.reshape(-1), items, items_int, ignore_index, reduction,
        float(label_smoothing), float(z_loss), compute_grad,
    )
    return loss.reshape(target.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------- references


def _row_losses(x, target, valid, label_smoothing, z_loss):
    """(per-row losses, zero where not valid; logsumexp) of 2-D logits ``x`` (differentiable)."""
    lse = torch.logsumexp(x, dim=-1)
    x_t = x.gather(1, target[:, None]).squeeze(1)
    rows = lse - (1.0 - label_smoothing) * x_t + z_loss * lse * lse
    if label_smoothing:
        # Only when smoothing: 0 * mean(x) is NaN for a row with -inf (masked) logits.
        rows = rows - label_smoothing * x.mean(-1)
    return torch.where(valid, rows, 0.0), lse


def cross_entropy_ref(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                      num_items=None):
    """PyTorch reference of ``cross_entropy`` (differentiable; fp32 math, fp64 for fp64 input)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.reshape(-1, logits.shape[-1]).to(compute)
    t = target.reshape(-1)
    valid = t != ignore_index
    rows, _ = _row_losses(x, torch.where(valid, t, 0).long(), valid, label_smoothing, z_loss)
    if reduction == "none":
        return rows.reshape(target.shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = valid.sum() if num_items is None else torch.as_tensor(num_items, device=x.device)
    return total / count.to(compute).clamp_min(1.0)
