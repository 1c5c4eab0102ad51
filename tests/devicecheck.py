"""A device-leak checker that needs no GPU: it simulates a second device by tagging tensors.

On a GPU machine the models live on ``cuda`` and every tensor that icd-lite creates without
``device=`` (``torch.zeros(3)``, ``torch.tensor(values)``, noise from ``torch.randn``, images from
``torch.from_numpy``) lands on the CPU; the first op that combines it with a CUDA tensor raises
"Expected all tensors to be on the same device". On a CPU-only machine both are the same device,
so the mistake is invisible. ``DeviceLeakChecker`` makes it visible: under it every tensor is
either *host* (where such a tensor would be on a GPU machine: the CPU) or *device* (where the
models are), and an op that mixes the two is recorded as a leak, with the op and the line of
icd-lite that made the call. See ``tests/test_device.py`` for what it catches and what it cannot.

Rules (a ``torch.overrides.TorchFunctionMode`` sees every torch call made in Python):

* host: a factory call (``torch.zeros``, ``ones``, ``full``, ``empty``, ``arange``, ``linspace``,
  ``tensor``, ``as_tensor``, ``eye``, ``rand``, ``randn``, ``randint``, ...) without ``device=``
  made by icd-lite code (the first frame outside torch and this file is a file of the
  ``icd_lite`` package, or a third-party library such as a tokenizer called from icd-lite with no
  ``nn.Module`` call in between); ``torch.from_numpy`` under the same rule; ``.cpu()`` and
  ``.to("cpu")`` with the literal string; the result of an op whose tensor inputs are all host;
* ``.to(<torch.device>)``, ``.to(<device tensor>)``, ``.cuda()`` make a device tensor, except
  that the ``.device`` of a host tensor is tracked: ``device=x.device`` or ``.to(x.device)`` with
  a host x makes a host tensor, as it would on a GPU machine;
  ``torch.tensor(t)`` / ``torch.as_tensor(t)`` of a tensor t keep t's status;
* everything else is device: model parameters, tensors made with an explicit ``device=`` (but
  the string ``device="cpu"`` in icd-lite is host, like ``.to("cpu")``), tensors the test made.

A leak is an op, called with icd-lite on the stack, whose tensor inputs mix host and device,
except what CUDA accepts too: a 0-dim host tensor (a CPU scalar; not in ``cat`` / ``stack``), a
host index into a device tensor (``x_cuda[cpu_index]``), ``copy_`` and ``.to``; ops that torch
itself makes inside its optimizers, autograd, gradient clipping and ``nn.Module``'s own machinery
(``.to``, ``load_state_dict``) are torch's business. A
factory call with a CPU ``generator=`` *and* a ``device=`` is also a leak: on CUDA it raises
(the convention is to draw on the CPU and move, ``torch.randn(shape, generator=g).to(device)``).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import SUPPORTED_NODES, tree_leaves

import icd_lite

ICD_DIR = os.path.dirname(os.path.abspath(icd_lite.__file__)) + os.sep
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
MODULE_CALL = os.path.join(TORCH_DIR, "nn", "modules", "module.py")
THIS_FILE = os.path.abspath(__file__)
THIRD_PARTY = tuple(sorted({os.path.abspath(p) + os.sep for p in (
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
    sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}))
# torch files that only dispatch a call (the op's caller is the frame above them) ...
TORCH_DISPATCH = tuple(os.path.join(TORCH_DIR, p) for p in (
    "overrides.py", "_tensor.py", "functional.py", os.path.join("nn", "functional.py"),
    "_jit_internal.py", os.path.join("utils", "_contextlib.py"), "_compile.py"))
# ... and torch code that handles devices itself (its ops are not icd-lite's business):
# optimizers, autograd, gradient clipping, nn.Module's own machinery (.to, load_state_dict).
TORCH_INTERNAL = tuple(os.path.join(TORCH_DIR, p) for p in (
    "optim" + os.sep, "autograd" + os.sep, os.path.join("nn", "utils") + os.sep,
    "utils" + os.sep, "_dynamo" + os.sep, "distributed" + os.sep,
    os.path.join("nn", "modules", "module.py")))

_T = torch
FACTORIES = {f for f in (
    _T.zeros, _T.ones, _T.full, _T.empty, _T.empty_strided, _T.arange, _T.linspace,
    _T.logspace, _T.tensor, _T.as_tensor, _T.asarray, _T.eye, _T.rand, _T.randn, _T.randint,
    _T.randperm, _T.scalar_tensor, _T.tril_indices, _T.triu_indices) if f is not None}
COPYING_FACTORIES = {_T.tensor, _T.as_tensor, _T.asarray}  # of a tensor: keep its status
CAT_LIKE = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack",
            "column_stack", "row_stack"}
NO_CHECK = {"copy_", "to", "cpu", "cuda", "__set__", "set_", "_make_subclass",
            "_has_compatible_shallow_copy_type"}


@dataclass(frozen=True)
class Leak:
    op: str
    where: str  # "icd_lite/<file>.py:<line>" of the innermost icd-lite frame
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.op} ({self.detail})"


def _file(frame) -> str:
    return os.path.abspath(frame.f_code.co_filename)


def _third_party(path: str) -> bool:
    return path.startswith(THIRD_PARTY) or path.startswith("<")


def _relative(frame) -> str:
    path = _file(frame)
    return f"icd_lite/{path[len(ICD_DIR):]}:{frame.f_lineno}"


class DeviceLeakChecker(TorchFunctionMode):
    """``with DeviceLeakChecker() as checker: ...`` then ``checker.leaks`` (a list of Leak)."""

    def __init__(self, host=()):
        """``host``: tensors made before the checker started that are on the CPU on a GPU
        machine too (e.g. the noise schedule's tables, made at import)."""
        super().__init__()
        self._host: dict[int, weakref.ref] = {}
        self._host_devices: dict[int, torch.device] = {}  # .device of host tensors (kept alive)
        self.leaks: list[Leak] = []
        self._seen: set[tuple[str, str]] = set()
        for tensor in host:
            self._tag(tensor, True)

    # -- tags -----------------------------------------------------------------------------------
    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def is_host_device(self, device) -> bool:
        """``device`` is the string "cpu" or the ``.device`` of a host tensor."""
        if isinstance(device, str):
            return device.split(":")[0] == "cpu"
        return self._host_devices.get(id(device)) is device

    def _tag(self, tensor: torch.Tensor, host: bool) -> None:
        key = id(tensor)
        if not host:
            self._host.pop(key, None)
            return

        def forget(ref, key=key, host=self._host):
            if host.get(key) is ref:
                del host[key]

        self._host[key] = weakref.ref(tensor, forget)

    # -- frames ---------------------------------------------------------------------------------
    @staticmethod
    def _made_by_icd_lite() -> bool:
        """Whether the calling code is icd-lite's: the first frame outside torch and this file
        is in icd_lite, or is third-party code (a tokenizer, the standard library) that icd-lite
        called directly, with no ``nn.Module`` call (a model's forward) in between."""
        frame, outside = sys._getframe(1), False
        while frame is not None:
            path = _file(frame)
            if path == THIS_FILE or path.startswith(TORCH_DIR):
                if outside and path == MODULE_CALL:
                    return False
            elif path.startswith(ICD_DIR):
                return True
            elif _third_party(path):
                outside = True
            else:  # a test, a notebook, a script: its tensors are the caller's business
                return False
            frame = frame.f_back
        return False

    @staticmethod
    def _where() -> str | None:
        """The innermost icd-lite frame of a mixing op, or None if the op is none of icd-lite's
        business (no icd-lite frame on the stack, or torch's own device-aware internals)."""
        frame = sys._getframe(1)
        while frame is not None and (_file(frame) == THIS_FILE
                                     or _file(frame).startswith(TORCH_DISPATCH)):
            frame = frame.f_back
        if frame is not None and _file(frame).startswith(TORCH_INTERNAL):
            return None
        while frame is not None:
            if _file(frame).startswith(ICD_DIR):
                return _relative(frame)
            frame = frame.f_back
        return None

    def _record(self, op: str, detail: str) -> None:
        where = self._where()
        if where is not None and (op, where) not in self._seen:
            self._seen.add((op, where))
            self.leaks.append(Leak(op, where, detail))

    # -- the mode -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        out = func(*args, **kwargs)
        if func in FACTORIES:
            self._factory(func, name, args, kwargs, out)
        elif name in ("to", "cpu", "cuda") and args and isinstance(args[0], torch.Tensor):
            out = self._move(name, args, kwargs, out)
        elif name == "__set__" and _descriptor(func) == "data":  # param.data = moved (Module.to)
            self._tag(args[0], self.is_host(args[1]))
        else:
            self._op(func, name, args, kwargs, out)
        return out

    def _factory(self, func, name, args, kwargs, out) -> None:
        device, generator = kwargs.get("device"), kwargs.get("generator")
        if (device is not None and generator is not None and generator.device.type == "cpu"
                and not self.is_host_device(device)):
            self._record(f"torch.{name}", "a CPU generator= with device=: CUDA refuses it; draw "
                                          "on the CPU, then .to(device)")
        if isinstance(device, str):  # "cpu" spelt out in icd-lite is the host
            host = device.split(":")[0] == "cpu" and self._made_by_icd_lite()
        elif device is not None:  # a model's device, or the device of a host tensor
            host = self.is_host_device(device)
        elif func in COPYING_FACTORIES and isinstance(_first(args, kwargs), torch.Tensor):
            host = self.is_host(_first(args, kwargs))
        else:
            host = self._made_by_icd_lite()
        for tensor in _tensors(out):
            self._tag(tensor, host)

    def _move(self, name, args, kwargs, out):
        """Tag the result of .to / .cpu / .cuda; returns it, as a new view when the move would
        change the status of a tensor that the CPU handed back as it was (x.cpu() is x)."""
        source = args[0]
        if name == "cpu":
            host = True
        elif name == "cuda":
            host = False
        else:
            target, other = kwargs.get("device"), kwargs.get("other")
            for value in args[1:]:
                if isinstance(value, torch.Tensor):
                    other = value
                elif isinstance(value, (str, torch.device)) or (
                        isinstance(value, int) and not isinstance(value, bool)):
                    target = value
            if other is not None:
                host = self.is_host(other)
            elif target is not None:
                host = self.is_host_device(target)
            else:  # a dtype change stays where it is
                host = self.is_host(source)
        if out is source and host != self.is_host(source):
            out = source.view_as(source)  # on a GPU machine, a copy on the other device
        self._tag(out, host)
        return out

    def _op(self, func, name, args, kwargs, out) -> None:
        inputs = _tensors((args, kwargs))
        if not inputs:
            return
        given = {id(t) for t in inputs}
        if name == "__get__" and _descriptor(func) == "device":
            if self.is_host(args[0]):  # x.device of a host tensor: where x is on a GPU machine
                self._host_devices[id(out)] = out
            return
        if name in ("__getitem__", "__setitem__") and not self.is_host(args[0]):
            index = {id(t) for t in _tensors(args[1])}  # CUDA takes CPU indices
            inputs = [t for t in inputs if id(t) not in index or not self.is_host(t)]
        host = [t for t in inputs if self.is_host(t)]
        device = [t for t in inputs if not self.is_host(t)]
        if host and device and name not in NO_CHECK:
            mixing = [t for t in host if name in CAT_LIKE or t.dim() > 0]
            if mixing:
                self._record(name, f"host {_shapes(mixing)} with device {_shapes(device)}")
        result_is_host = bool(host) and not device
        for tensor in _tensors(out):
            if id(tensor) not in given and (result_is_host or self.is_host(tensor)):
                self._tag(tensor, result_is_host)  # in-place ops, no-op views keep their tag

    # -- torch.from_numpy does not go through __torch_function__: wrap it while active --------
    def __enter__(self):
        original = torch.from_numpy
        self._original_from_numpy = original

        def from_numpy(array):
            tensor = original(array)
            if self._made_by_icd_lite():
                self._tag(tensor, True)
            return tensor

        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._original_from_numpy
        return super().__exit__(*exc)

    def report(self) -> str:
        if not self.leaks:
            return "no device leak"
        return (f"{len(self.leaks)} device leak(s): a tensor made on the host (the CPU on a GPU "
                f"machine) meets one on the model's device:\n"
                + "\n".join(f"  {leak}" for leak in self.leaks))


def _descriptor(func) -> str | None:
    """The attribute of a property's __get__ / __set__ (``x.device``, ``x.data = y``)."""
    return getattr(getattr(func, "__self__", None), "__name__", None)


def _first(args, kwargs):
    return args[0] if args else kwargs.get("data")


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in args / kwargs / results: tuples, lists and dicts are walked here (pytree's
    own walk would be most of the checker's cost), any other pytree node by
    ``torch.utils._pytree.tree_leaves``."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif type(node) in SUPPORTED_NODES:
            stack.extend(tree_leaves(node))
    return found


def _shapes(tensors) -> str:
    return ", ".join(str(list(t.shape)) for t in tensors[:3])


def import_time_host_tensors() -> list[torch.Tensor]:
    """icd-lite's tensors made at import, which stay on the CPU on a GPU machine: the tables of
    the SD1.5 noise schedule."""
    from icd_lite.schedule import SD15_SCHEDULE

    return [value for value in vars(SD15_SCHEDULE).values() if isinstance(value, torch.Tensor)]


@contextmanager
def no_leaks():
    """``with no_leaks(): ...`` fails with the checker's report if anything leaked."""
    with DeviceLeakChecker(host=import_time_host_tensors()) as checker:
        yield checker
    assert not checker.leaks, checker.report()
