"""torch.library triton_ops registered on first use. Registering the first one imports torch._dynamo
and inductor (about a second), which a process that never runs a Triton kernel (a CPU run, `moebench
--help`) should not pay. A model whose Impl takes Triton kernels registers them all when it is built
(moebench/impl.py), so torch.compile never traces a registration."""
from __future__ import annotations

import functools
from typing import Callable

from torch.library import triton_op

_ALL: list[LazyTritonOp] = []


class LazyTritonOp:
    """Calls through `triton_op(name, mutates_args)(fn)`, made on the first call or by register()."""

    def __init__(self, name: str, mutates_args: tuple[str, ...], fn: Callable):
        self.name, self.mutates_args, self.fn, self.op = name, mutates_args, fn, None
        functools.update_wrapper(self, fn)
        _ALL.append(self)

    def register(self):
        if self.op is None:
            self.op = triton_op(self.name, mutates_args=self.mutates_args)(self.fn)
        return self.op

    def __call__(self, *args, **kwargs):
        return (self.op or self.register())(*args, **kwargs)


def lazy_triton_op(name: str, *, mutates_args: tuple[str, ...]) -> Callable[[Callable], LazyTritonOp]:
    return lambda fn: LazyTritonOp(name, tuple(mutates_args), fn)


def register_all() -> None:
    """Register every op defined so far (the ops modules define theirs at import)."""
    for op in _ALL:
        op.register()
