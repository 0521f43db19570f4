"""NCCL's rules for a training or validation step, enforced on gloo and CPU.

On GPU clusters the backend is NCCL, which (a) has no CPU tensors: a collective or point-to-point op
on a CPU tensor fails with "No backend type associated with device type cpu"; (b) makes every object
collective (``all_gather_object``, ``broadcast_object_list``, ...) a pickle and a host round trip; (c)
ignores point-to-point tags, so code that tells messages apart by tag is wrong there. ``nccl_rules``
records every collective and point-to-point call a process makes (op, tensor devices, tag, caller
file:line) and reports, for the calls made inside a step, the ones that break a rule.

Rule (a) on a CPU-only machine, where the root device *is* the CPU: provenance. A
``TorchFunctionMode`` (``_Provenance``) marks every tensor made by a factory (``torch.tensor``,
``zeros``, ``arange``... torch's own list of device constructors) without ``device=``, or with the
literal ``device="cpu"``, or by ``.cpu()``, as a host tensor, with the file:line that made it; an op
whose tensor inputs are all host tensors makes host tensors (``.float()``, ``.view()``, ``stack``...),
an op with any tensor on the device makes device tensors (on a GPU a CPU scalar times a CUDA tensor is
CUDA), ``.to(device)`` and ``.cuda()`` make device tensors, ``.to(dtype)`` keeps the input's kind, an
in-place op keeps its destination's. Tensors made before the rules were switched on (parameters,
the batch Lightning moved to the root device) are device tensors. A collective's tensor on another
device than the root, or made on the host, is a violation of (a): on a GPU this tensor would be a CPU
tensor, exactly NCCL's error. The check can fail (tests/distributed/test_nccl_rules.py proves it on a
deliberate ``torch.zeros(1)`` all-reduce inside a step).

Considered and not taken: running the step under ``torch.set_default_device("meta")`` so that such a
tensor lands on meta. The first meta tensor ends the step (gloo cannot send it, ``.item()`` and
``.tolist()`` cannot read it, and an op mixing it with real tensors fails far from where it was made),
so a run reports one finding, not all of them, and a tensor legitimately kept on the host (sizes read
back with ``.tolist()``) crashes as if it were a bug. Provenance records and lets the step go on.

What is traced where: the mode is thread-local, so it is also entered in every thread started while
the rules are on (the DualPipe overlap's backward worker) and around every custom autograd Function's
backward (the engine calls those after ``Tensor.backward`` has left the mode). Ops inside autograd's
own C++ backward need no tracing (gradients are made on their forward tensors' devices). Not seen:
collectives issued from C++ (DDP's reducer: its buckets are on the parameters' device), methods of a
``ProcessGroup`` object called directly, and host tensors made before the rules were switched on.

Also counted, as information: host reads of device tensors during a step (``.item()``, ``.tolist()``,
``bool()``, ``int()``, ``float()``, ``.cpu()``, ``.numpy()``), each a device synchronisation on a GPU.

Every public collective and point-to-point function of ``torch.distributed`` (with
``distributed_c10d``), its functional collectives and ``torch.distributed.nn.functional`` is replaced
while the rules are on, in those modules and in every imported module that holds the original under
its own name (``from torch.distributed import isend``); only the outermost call is recorded (an
``all_gather_object`` is one call, not its inner ``all_gather``s).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
import torch.distributed.nn.functional as dist_nn
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[2]
TORCH = Path(torch.__file__).resolve().parent
HOST = "_nccl_host"
"""Attribute of a tensor made on the host: the file:line that made it."""

NOT_COMMUNICATION = ("get_", "is_", "new_", "init_", "destroy_", "split_", "shrink_", "supports_", "record_")
"""Prefixes of the functions in ``distributed_c10d.__all__`` that move no data; every other function
there is wrapped, so that a collective torch adds (2.13's ``reduce_scatter_single``) is seen."""
P2P = ("send", "recv", "isend", "irecv", "batch_isend_irecv")
LEGACY = ("_all_gather_base", "_reduce_scatter_base", "broadcast_object")
"""Older or private names still callable."""
FUNCTIONAL = (
    "all_reduce", "all_reduce_coalesced", "all_gather_tensor", "all_gather_tensor_autograd",
    "all_gather_into_tensor_coalesced", "reduce_scatter_tensor", "reduce_scatter_tensor_autograd",
    "reduce_scatter_tensor_coalesced", "all_to_all_single", "all_to_all_single_autograd", "broadcast",
    "permute_tensor",
)
DIST_NN = ("all_reduce", "all_gather", "all_to_all", "all_to_all_single", "broadcast", "gather", "scatter",
           "reduce", "reduce_scatter")

_SKIPPED_FILES = {
    __file__,
    *(str(TORCH / p) for p in (
        "overrides.py", "_tensor.py", "utils/_device.py", "autograd/function.py", "distributed/distributed_c10d.py",
        "distributed/c10d_logger.py", "distributed/_functional_collectives.py", "distributed/nn/functional.py",
        "utils/_contextlib.py",
    )),
}
_SYNCS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int", torch.Tensor.__float__: "float", torch.Tensor.__index__: "index",
    torch.Tensor.cpu: "cpu", torch.Tensor.numpy: "numpy",
}
_CONSTRUCTORS = _device_constructors() | {torch.from_numpy, torch.frombuffer}


def _where(path: str) -> str:
    """A path relative to the repository, or to site-packages for torch's and Lightning's files."""
    p = Path(path)
    if p.is_relative_to(ROOT) and ".venv" not in p.relative_to(ROOT).parts:
        return str(p.relative_to(ROOT))
    return str(p.relative_to(TORCH.parent)) if p.is_relative_to(TORCH.parent) else path


def _sites() -> tuple[str, str]:
    """(the innermost caller outside torch's dispatch and c10d wrappers, the innermost frame of this
    repository outside .venv), each as file:line."""
    frame, site, origin = sys._getframe(2), "", ""
    while frame is not None and not origin:
        name = frame.f_code.co_filename
        if name not in _SKIPPED_FILES:
            here = f"{_where(name)}:{frame.f_lineno}"
            site = site or here
            if name.startswith(str(ROOT)) and "/.venv/" not in name:
                origin = here
        frame = frame.f_back
    return site, origin or site


@dataclass
class Violation:
    rule: str
    """"a" device, "b" object collective, "c" point-to-point tag."""
    message: str


@dataclass
class Call:
    op: str
    kind: str
    """collective, p2p, object, functional."""
    step: str
    """e.g. "train 0" or "val 1 @ 2" (validation batch 1 after 2 optimizer steps); "" outside steps."""
    site: str
    origin: str
    devices: list[str]
    tag: int = 0
    violations: list[Violation] = field(default_factory=list)


class Recorder:
    """Every call of one process, and its host reads per step."""

    def __init__(self, root_device: torch.device | str) -> None:
        self.root_device = torch.device(root_device)
        self.step = ""
        self.calls: list[Call] = []
        self.syncs: dict[str, Counter] = {}

    @property
    def violations(self) -> list[Call]:
        return [c for c in self.calls if c.step and c.violations]

    def record(self, kind: str, op: str, arguments: dict[str, Any]) -> None:
        site, origin = _sites()
        values, _ = tree_flatten(list(arguments.values()))
        p2p_ops = [v for v in values if isinstance(v, c10d.P2POp)]
        tensors = [v for v in values if isinstance(v, torch.Tensor)] + [o.tensor for o in p2p_ops]
        tag = int(arguments.get("tag") or 0)
        call = Call(op, kind, self.step, site, origin, sorted({str(t.device) for t in tensors}), tag)
        if kind == "object":
            call.violations.append(Violation("b", f"object collective {op} (pickles, a host round trip per call)"))
        else:
            for t in tensors:
                made = getattr(t, HOST, None)
                if t.device != self.root_device:
                    call.violations.append(Violation("a", f"{op}: a tensor on {t.device}, not the root device {self.root_device}"))
                elif made:
                    call.violations.append(Violation("a", f"{op}: a tensor made on the host at {made}: "
                                                          "a CPU tensor on a GPU, which NCCL refuses"))
        tags = [tag] + [o.tag for o in p2p_ops if not getattr(o, "_nccl_reported", False)]
        if any(tags):
            call.tag = max(tags, key=abs)
            call.violations.append(Violation("c", f"{op} with tag {call.tag} (NCCL ignores tags)"))
        self.calls.append(call)

    def count_sync(self, what: str) -> None:
        site, origin = _sites()
        label = site if site == origin else f"{site} (from {origin})"
        self.syncs.setdefault(self.step, Counter())[f"{what} at {label}"] += 1

    def to_json(self) -> dict:
        return {"root_device": str(self.root_device), "calls": [asdict(c) for c in self.calls],
                "syncs": {k: dict(v) for k, v in self.syncs.items()}}


_active: Recorder | None = None
_local = threading.local()  # depth of recorded calls on this thread: inner calls are not recorded


def _tensors(values) -> list[torch.Tensor]:
    """The tensors of an op's arguments or results, one level of lists and tuples deep."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def _is_host(t: Any) -> str | None:
    return getattr(t, HOST, None) if isinstance(t, torch.Tensor) else None


def _target_device(func, args, kwargs):
    """What ``.to``/``.cuda``/``.cpu`` moves to: "host", "device", a tensor to follow, or None (dtype only)."""
    if func is torch.Tensor.cpu:
        return "host"
    if func is torch.Tensor.cuda:
        return "device"
    for value in (kwargs.get("device"), *args[1:]):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool):
            return "host" if str(value).startswith("cpu") else "device"
        if isinstance(value, torch.device):
            return "device"
    return None


class _Provenance(TorchFunctionMode):
    """Marks host tensors (module docstring) and counts host reads during a step."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = _active
        if rec is not None and rec.step and func in _SYNCS and args and isinstance(args[0], torch.Tensor):
            if not _is_host(args[0]) and args[0].device.type != "meta":
                rec.count_sync(_SYNCS[func])
        out = func(*args, **kwargs)
        made = self._host(func, args, kwargs)
        if made is not None:
            for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
                try:
                    setattr(t, HOST, made)
                except (AttributeError, RuntimeError):
                    pass
        elif func in (torch.Tensor.to, torch.Tensor.cuda) and isinstance(out, torch.Tensor) and _is_host(out):
            if out is args[0] and _target_device(func, args, kwargs) == "device":
                delattr(out, HOST)  # moved "to the device" in place: on a GPU it would be a new tensor
        return out

    @staticmethod
    def _host(func, args, kwargs) -> str | None:
        """The file:line a host output of ``func`` is blamed on, or None (a device output, or in place)."""
        if func in _CONSTRUCTORS:
            device = kwargs.get("device")
            if device is None and func not in (torch.as_tensor, torch.asarray):
                return f"{_sites()[0]} ({getattr(func, '__name__', func)} without device=)"
            if device is None:  # as_tensor keeps a tensor's device
                return _is_host(args[0]) if args and isinstance(args[0], torch.Tensor) else _sites()[0]
            return f"{_sites()[0]} (device='cpu')" if str(device).startswith("cpu") and isinstance(device, str) else None
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
            target = _target_device(func, args, kwargs)
            if target == "host":
                return f"{_sites()[0]} (.cpu() / .to('cpu'))"
            if isinstance(target, torch.Tensor):
                return _is_host(target)
            if target == "device":
                return None
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or "out" in kwargs or name == "__setitem__":
            return None  # in place: the destination keeps its kind
        tensors = _tensors((*args, *kwargs.values()))
        if not tensors or not all(_is_host(t) for t in tensors):
            return None
        return _is_host(tensors[0])


def _traced(fn):
    """Runs ``fn`` under a ``_Provenance`` mode unless this thread already has one."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if any(isinstance(m, _Provenance) for m in _get_current_function_mode_stack()):
            return fn(*args, **kwargs)
        with _Provenance():
            return fn(*args, **kwargs)

    return run


def _wrap(kind: str, op: str, original):
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        rec = _active
        if rec is None or getattr(_local, "depth", 0):
            return original(*args, **kwargs)
        _local.depth = 1
        try:
            try:
                arguments = signature.bind(*args, **kwargs).arguments if signature else {"args": args, **kwargs}
            except TypeError:
                arguments = {"args": args, **kwargs}
            rec.record(kind, op, arguments)
            return original(*args, **kwargs)
        finally:
            _local.depth = 0

    wrapper._nccl_original = original
    return wrapper


def _kind(name: str) -> str:
    return "object" if "object" in name else "p2p" if name in P2P else "collective"


def _targets() -> list[tuple[Any, str, str]]:
    names = [
        n for n in (*c10d.__all__, *LEGACY)
        if not n.startswith(NOT_COMMUNICATION) and n != "reduce_op" and inspect.isfunction(getattr(c10d, n, None))
    ]
    out = [(mod, name, _kind(name)) for mod in (dist, c10d) for name in names]
    out += [(funcol, name, "functional") for name in FUNCTIONAL]
    out += [(dist_nn, name, "functional") for name in DIST_NN]
    return [(m, n, k) for m, n, k in out if hasattr(m, n)]


@contextmanager
def _patched(recorder: Recorder) -> Iterator[None]:
    global _active
    wrappers: dict[int, Any] = {}
    undo: list[tuple[Any, str, Any]] = []
    for module, name, kind in _targets():
        original = getattr(module, name)
        if id(original) not in wrappers:
            wrappers[id(original)] = _wrap(kind, name, original)
    originals = {id(w._nccl_original): w for w in wrappers.values()}
    for module in list(sys.modules.values()):  # dist, c10d and every `from torch.distributed import x`
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for name, value in items:
            wrapper = originals.get(id(value))
            if wrapper is not None and wrapper._nccl_original is value and module is not sys.modules[__name__]:
                undo.append((module, name, value))
                setattr(module, name, wrapper)
    sends = {c10d.isend, c10d.isend._nccl_original, c10d.irecv, c10d.irecv._nccl_original}
    check_op, p2p_init = c10d._check_op, c10d.P2POp.__init__

    def _check_op(op):  # P2POp takes the original isend/irecv and their wrappers
        if op not in sends:
            check_op(op)

    def init(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):
        p2p_init(self, op, tensor, peer, group, tag, group_peer)
        if op in sends:  # batch_isend_irecv asks `op is isend` of c10d's (wrapped) isend
            self.op = c10d.isend if "send" in op.__name__ else c10d.irecv
        if tag and _active is not None and _active.step:
            _active.record("p2p", "P2POp", {"tag": tag})  # the tensor is checked where it is sent
            self._nccl_reported = True

    run, apply, apply_boxed = threading.Thread.run, BackwardCFunction.apply, BackwardCFunction.apply_boxed
    c10d._check_op, c10d.P2POp.__init__ = _check_op, init
    threading.Thread.run = _traced(run)  # threads started meanwhile trace too (the overlap's worker)
    BackwardCFunction.apply, BackwardCFunction.apply_boxed = _traced(apply), _traced(apply_boxed)
    _active = recorder
    try:
        yield
    finally:
        _active = None
        threading.Thread.run, BackwardCFunction.apply, BackwardCFunction.apply_boxed = run, apply, apply_boxed
        c10d._check_op, c10d.P2POp.__init__ = check_op, p2p_init
        for module, name, value in reversed(undo):
            setattr(module, name, value)


@contextmanager
def nccl_rules(root_device: torch.device | str, *, step: str = "step") -> Iterator[Recorder]:
    """Records this process's collectives and point-to-point calls while open; ``step`` labels them
    (calls with an empty label are outside any step: recorded, never violations). Yields the
    ``Recorder``; ``recorder.violations`` lists the calls that break a rule."""
    recorder = Recorder(root_device)
    recorder.step = step
    with _patched(recorder), _Provenance():
        yield recorder


class NcclRulesCallback:
    """The rules on from ``setup`` to ``teardown`` of a Lightning run, steps marked by two callbacks:
    ``begin`` (first in ``trainer.callbacks``) and ``end`` (after every other callback but the
    checkpoints, which Lightning puts last), so that a step is on_train_batch_start .. training_step,
    backward, optimizer step .. on_train_batch_end, and the same for validation batches; setup, the
    checkpoint saves, epoch ends and teardown are outside. Each rank writes ``rank<r>.json`` to ``out_dir``."""

    def __init__(self, out_dir: Path | str) -> None:
        self.out_dir = Path(out_dir)
        self.recorder: Recorder | None = None
        self._context = None
        self.begin, self.end = _Begin(self), _End(self)

    def open(self, trainer: L.Trainer) -> None:
        if self._context is None:
            self._context = nccl_rules(trainer.strategy.root_device, step="")
            self.recorder = self._context.__enter__()

    def close(self, trainer: L.Trainer) -> None:
        if self._context is None:
            return
        self._context.__exit__(None, None, None)
        self._context = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.recorder.to_json()))


class _Begin(L.Callback):
    def __init__(self, rules: NcclRulesCallback) -> None:
        self.rules = rules

    def setup(self, trainer, pl_module, stage):
        self.rules.open(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rules.recorder.step = f"train {trainer.global_step}"

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.rules.recorder.step = f"val {batch_idx} @ {trainer.global_step}"

    def on_exception(self, trainer, pl_module, exception):
        self.rules.close(trainer)


class _End(L.Callback):
    def __init__(self, rules: NcclRulesCallback) -> None:
        self.rules = rules

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rules.recorder.step = ""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.rules.recorder.step = ""

    def teardown(self, trainer, pl_module, stage):
        self.rules.close(trainer)


def load(out_dir: Path | str) -> dict[int, dict]:
    """rank -> what ``NcclRulesCallback`` wrote."""
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))}


def in_step_violations(ranks: dict[int, dict], rule: str) -> list[str]:
    """One line per distinct (op, site, message) of ``rule`` inside steps, over every rank: how many
    calls, on which ranks, in which steps."""
    found: dict[tuple[str, str, str], dict] = {}
    for rank, data in ranks.items():
        for call in data["calls"]:
            site = call["site"] if call["site"] == call["origin"] else f"{call['site']} (from {call['origin']})"
            for v in call["violations"]:
                if call["step"] and v["rule"] == rule:
                    entry = found.setdefault((call["op"], site, v["message"]), {"calls": 0, "ranks": set(), "steps": set()})
                    entry["calls"] += 1
                    entry["ranks"].add(rank)
                    entry["steps"].add(call["step"])
    return [
        f"{op} at {site}: {message} [{e['calls']} call(s), ranks {sorted(e['ranks'])}, steps {sorted(e['steps'])}]"
        for (op, site, message), e in sorted(found.items())
    ]


def syncs_per_step(ranks: dict[int, dict]) -> dict[int, dict[str, int]]:
    """rank -> training step -> host reads of device tensors in that step."""
    return {r: {k: sum(v.values()) for k, v in d["syncs"].items() if k.startswith("train")} for r, d in ranks.items()}
