"""The eager fast path of fastlm's ops: the registered torch.library op when something traces, a plain
call otherwise.

Every fastlm op is a ``torch.library.custom_op`` with a fake implementation and an autograd formula, so
torch.compile, export and ``torch.library.opcheck`` see one opaque op. In eager mode that route costs
20-40 us per call (dispatcher, Python kernel wrapper, aliasing check, a generated autograd.Function and
a redispatch), forward and backward: more than the C++ kernel itself on a small tensor (rms_norm on one
128-wide row: 0.6 us of kernel). ``custom_op`` below registers the op exactly as
``torch.library.custom_op`` does and returns an ``EagerOp``. Called in plain eager mode, it runs the SAME
implementation function directly, with no autograd when no input needs a gradient, else through a plain
``torch.autograd.Function`` made of the SAME ``setup_context`` and ``backward`` the op registers. One
implementation, identical numerics (tests/test_eager.py checks forward and gradients bit for bit).

The registered op (``torch.ops.fastlm.*``) runs instead whenever something must see it or could not
cope with a direct call:

* torch.compile / dynamo tracing (``torch.compiler.is_compiling()``), jit tracing;
* an active TorchDispatchMode (FakeTensorMode, make_fx and export tracing, functionalization,
  FlopCounterMode) or torch function mode (including ``with torch.device(...)``);
* functorch transforms (vmap, grad, jvp), whose wrapped tensors a kernel cannot read;
* a tensor subclass argument (FakeTensor, DTensor, ...): only ``torch.Tensor`` and ``nn.Parameter`` pass;
* an op without an autograd formula asked for a gradient (double backward through a backward op), so
  autograd reports it as before; a mutating op whose inputs need a gradient;
* inside ``use_custom_ops()`` (benchmarks and tests compare the two routes with it).
"""

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Sequence

import torch

_custom_ops_only: contextvars.ContextVar[bool] = contextvars.ContextVar("fastlm_custom_ops_only", default=False)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


@contextlib.contextmanager
def use_custom_ops():
    """Inside this block every fastlm op call goes through its registered torch.library op."""
    token = _custom_ops_only.set(True)
    try:
        yield
    finally:
        _custom_ops_only.reset(token)


def _needs_dispatcher() -> bool:
    """True when a call must go through the registered op: see the module docstring for each case.

    The checks are the C functions behind torch's own helpers (``torch.jit.is_tracing``,
    ``torch.utils._python_dispatch._get_current_dispatch_mode``, ...): each costs ~0.1 us here.
    """
    return (
        _custom_ops_only.get()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._get_tracing_state() is not None
    )


def is_concrete(t: torch.Tensor) -> bool:
    """True when ``t`` is a plain tensor holding values that may be read now: not a fake, functional or
    traced tensor (torch.compile, export, opcheck's fake passes), nor a tensor subclass."""
    return type(t) in _PLAIN_TENSORS and not torch.compiler.is_compiling() and not _needs_dispatcher()


class EagerOp:
    """A registered custom op (``self.op``, the ``CustomOpDef``) whose calls take the eager fast path.

    ``register_fake`` and ``register_autograd`` register on the custom op as torch.library's do; the
    latter also builds the autograd.Function the fast path uses, from the same two functions.
    """

    def __init__(self, name: str, fn: Callable, mutates_args: Sequence[str]):
        self.op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        namespace, opname = name.split("::")
        self._overload = getattr(getattr(torch.ops, namespace), opname).default
        self._fn = fn
        self._signature = inspect.signature(fn)
        self._nargs = len(self._signature.parameters)
        self._mutated_positions = tuple(tuple(self._signature.parameters).index(a) for a in mutates_args)
        self._function: type[torch.autograd.Function] | None = None
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        def forward(ctx, *args):
            output = fn(*args)
            setup_context(ctx=ctx, inputs=args, output=output)
            return output

        self._function = type(
            f"{self.__name__}_eager", (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args, **kwargs):
        # Checked first and alone: dynamo folds it to True and traces only the registered op's call.
        if torch.compiler.is_compiling() or _needs_dispatcher():
            return self._overload(*args, **kwargs)
        if kwargs or len(args) != self._nargs:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            args = bound.args
        needs_grad = False
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) not in _PLAIN_TENSORS:
                    return self._overload(*args)
                needs_grad = needs_grad or a.requires_grad
        if needs_grad and torch.is_grad_enabled():
            if self._function is None or self._mutated_positions:
                return self._overload(*args)
            return self._function.apply(*args)
        output = self._fn(*args)
        for i in self._mutated_positions:
            # What the dispatcher's ADInplaceOrView kernel does for a mutated argument: autograd then
            # detects a later use of a value saved before the mutation.
            if args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        return output


def custom_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], EagerOp]:
    """``torch.library.custom_op(name, mutates_args=...)`` as a decorator, returning an ``EagerOp``."""

    def register(fn: Callable) -> EagerOp:
        return EagerOp(name, fn, mutates_args)

    return register
