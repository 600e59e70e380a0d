"""``torch.export`` files (format ``torch_export``), read safely.

``torch.export.load`` trusts its file (torch: "uses pickle under the hood ... never load data
from an untrusted source"), and a job's ``model.path`` is untrusted like its definition.  Read as
it is, a .pt2 could run code while loading (pickled payloads; an AOTInductor library; shape
expressions parsed by sympy, i.e. eval; guard code that ``program.module()`` exec's) and while
running (a graph node may call any torch.* function).  So the archive is checked before torch
reads it, and the graph after.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile

from ..engines import ModelError

_SYMBOL = re.compile(r"[A-Za-z]\w*")  # the only strings an expression may hold (symbol names)
_GUARD_NAMES = frozenset({"L", "math", "torch", "inf", "abs", "min", "max", "int", "float", "round", "bool",
                          "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"})
_ARITHMETIC = (ast.Expression, ast.Load, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
               ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


def _only(text: str, allowed) -> bool:
    """Whether ``text`` parses as a Python expression whose every node ``allowed`` accepts."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return all(allowed(node) for node in ast.walk(tree))


def _sympy_expression_is_plain(text: str) -> bool:
    """Whether ``text`` (a shape expression, which the loader hands to sympy's eval) only builds
    sympy objects from numbers and symbol names: no attributes, no other calls, no other strings."""
    import sympy
    import torch.utils._sympy.functions as shape_functions

    def allowed(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            obj = getattr(shape_functions, node.id, None) or getattr(sympy, node.id, None)
            sympy_thing = isinstance(obj, sympy.Basic) or isinstance(obj, type) and issubclass(obj, sympy.Basic)
            return sympy_thing or re.fullmatch(r"[a-z]+\d+", node.id) is not None  # or a symbol, like s77
        if isinstance(node, ast.Constant):
            return not isinstance(node.value, str) or _SYMBOL.fullmatch(node.value) is not None
        if isinstance(node, ast.keyword):
            return isinstance(node.value, ast.Constant) and not isinstance(node.value.value, str)
        return isinstance(node, (ast.Call, *_ARITHMETIC))

    return _only(text, allowed)


def _guard_is_plain(text: str) -> bool:
    """Whether ``text`` (a guard, which ``program.module()`` exec's) only compares input sizes:
    e.g. ``L['x'].size()[0] <= 8``."""
    def allowed(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in _GUARD_NAMES
        if isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            return (node.attr in ("size", "stride", "storage_offset") or base == "math" and not node.attr.startswith("_")
                    or base == "torch" and node.attr.startswith("sym_"))
        if isinstance(node, ast.Constant):  # strings end up inside a generated "..." literal
            return not isinstance(node.value, str) or re.fullmatch(r"\w*", node.value) is not None
        return isinstance(node, (ast.Call, ast.Subscript, *_ARITHMETIC))

    return _only(text, allowed)


def _check_pt2_archive(path: str, data: bytes) -> None:
    """Refuse what ``torch.export.load`` would run as code: see the comment above."""
    import torch

    def refused(why: str) -> ModelError:
        return ModelError(f"model file {path!r} is refused: {why}. torch.export.load would run it as code; "
                          f"chunk_ops loads torch.export.save files of plain programs (torch operators, tensors)")

    def unpickles_safely(member: str) -> bool:  # then torch's own unpickling of it runs nothing else either
        try:
            torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)
        except Exception:
            return False
        return True

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.namelist() if not m.endswith("/")]
    except (zipfile.BadZipFile, ValueError) as e:
        raise ModelError(f"model file {path!r} is not a readable torch.export file: {e}") from None
    for member in members:
        root, _, name = member.partition("/")
        if not name:  # a file at the top: the pre-2.8 format, whose loader falls back to unpickling anything
            raise refused(f"it is an old torch.export format (it holds {member!r}); save it again with this torch")
        if name.endswith(".pt") and not unpickles_safely(member):
            raise refused(f"{member!r} is a pickle of more than tensors")
        if name.startswith("models/") and name.endswith(".json"):
            try:
                program = json.loads(archive.read(member))
            except ValueError as e:
                raise ModelError(f"model file {path!r} is not a readable torch.export file: {e}") from None
            for key, value in _json_items(program):
                if key == "expr_str" and not _sympy_expression_is_plain(str(value)):
                    raise refused(f"a shape expression is not plain arithmetic: {value!r}")
                if key == "guards_code":
                    for guard in value if isinstance(value, list) else [value]:
                        if not _guard_is_plain(str(guard)):
                            raise refused(f"a guard is not a comparison of input sizes: {guard!r}")
        elif name.endswith("_config.json") and name.startswith(("data/weights/", "data/constants/")):
            folder = name.rsplit("/", 1)[0]
            try:
                config = json.loads(archive.read(member))["config"]
            except (ValueError, KeyError, TypeError):
                config = None
            if not isinstance(config, dict) or not all(isinstance(p, dict) for p in config.values()):
                raise ModelError(f"model file {path!r} is not a readable torch.export file: "
                                 f"{member!r} is not a payload configuration")
            for fqn, payload in config.items():
                stored = str(payload.get("path_name", ""))
                if folder == "data/constants" and not stored.startswith("tensor_"):
                    raise refused(f"constant {fqn!r} is a Python or TorchBind object, not a tensor")
                pickled = f"{root}/{folder}/{stored}"
                if payload.get("use_pickle") and not (pickled in members and unpickles_safely(pickled)):
                    raise refused(f"{fqn!r} is a pickle of more than tensors")
        elif not name.startswith(("models/", "data/weights/", "data/constants/", "data/sample_inputs/", "extra/",
                                  ".data/", "archive_format", "archive_version", "byteorder")):
            raise refused(f"it holds {member!r} (compiled code, e.g. AOTInductor, or a part chunk_ops does not know)")


def _json_items(value):
    """Every (key, value) pair in a JSON document, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _json_items(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_items(item)


_SHAPE_ARITHMETIC = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "and_", "or_", "not_",
    "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "ceil", "floor", "trunc", "round"})


def _check_graph_calls(path: str, program) -> None:
    """Refuse a graph that calls anything but torch operators and shape arithmetic (the loader
    resolves a node's target by name under ``torch``, ``math`` or ``operator``; torch's own
    verifier refuses most other targets already: this holds if a later torch allows more)."""
    import types

    import torch
    import torch.amp.autocast_mode as autocast

    try:
        from torch._export.serde.serialize import _SYM_OPS  # torch.sym_max...: shape arithmetic
    except ImportError:  # a later torch: refuse them rather than guess what they are
        _SYM_OPS = frozenset()
    operators = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)
    modes = {torch._C._set_grad_enabled, torch.autograd.grad_mode.set_grad_enabled,
             autocast._enter_autocast, autocast._exit_autocast}

    def allowed(target) -> bool:
        if isinstance(target, operators) or target in _SYM_OPS or target in modes:
            return True
        return (isinstance(target, types.BuiltinFunctionType) and target.__name__ in _SHAPE_ARITHMETIC
                and target.__module__ in ("_operator", "math", "builtins"))

    for graph_module in program.graph_module.modules():
        graph = getattr(graph_module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            if node.op == "call_function" and not allowed(node.target):
                raise ModelError(f"model file {path!r} is refused: its graph calls {node.target!r}, not a torch "
                                 f"operator; chunk_ops runs torch.export programs of torch operators only")
            if node.op == "call_function" and _in_training_mode(node):
                raise ModelError(f"model file {path!r} was exported in training mode ({node.target} normalizes "
                                 f"by batch or drops out): each patch's output would depend on its batch. "
                                 f"Export it after module.eval()")


def _in_training_mode(node) -> bool:
    """A batch norm that uses batch statistics, or a dropout that drops: an export of a module
    in training mode (``eval()`` cannot switch an exported program's graph)."""
    name, args = str(node.target), node.args
    if "batch_norm" in name:
        if "_legit_no_training" in name:
            return False
        if "_legit_functional" in name or name.endswith("_native_batch_norm_legit.default"):
            return True
        return len(args) > 5 and args[5] is True  # (input, weight, bias, mean, var, training, ...)
    if "dropout" in name:
        return len(args) > 2 and args[2] is True  # (input, p, train)
    return False


def load_exported_program(path: str, data: bytes):
    """A ``torch.export.save`` file as a ``torch.export.ExportedProgram``, read by ``torch.export.load``
    once it is known to hold nothing that torch would execute as code.

    Runs while loading: JSON parsing of the graph; unpickling of tensors only (each pickled
    part must load with ``weights_only=True`` first); sympy parsing of shape expressions that
    are plain arithmetic on symbols.  Refused before loading: pickles of other objects, Python
    ("opaque") and TorchBind constants, AOTInductor or other compiled payloads, the pre-2.8
    format, shape expressions or guards that are more than arithmetic and size comparisons.
    Refused after loading: graph nodes that call anything but torch operators (ATen and the
    custom operators already registered in this process) and shape arithmetic.  Nothing is
    imported: an operator that is not registered makes the file unreadable.
    """
    import torch

    _check_pt2_archive(path, data)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise ModelError(f"model file {path!r} is not a readable torch.export file: {type(e).__name__}: {e}") from None
    _check_graph_calls(path, program)
    return program


def program_input_shape(program) -> list:
    """A torch.export program's input ``(batch, channel, z, y, x)`` dimensions, None where dynamic."""
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise ModelError(f"the torch.export program takes {len(inputs)} inputs; chunk_ops gives it one, "
                         f"a (batch, channel, z, y, x) tensor")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    return [d if isinstance(d, int) else None for d in node.meta["val"].shape]


def exported_module(program, device: str):
    """A torch.export program as a Module on ``device`` (as TorchEngine resolves it)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, "cuda")  # the graph's device arguments too, not only its weights
    return program.module()
