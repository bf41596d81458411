"""Graph passes on an exported QDQ ONNX model (``onnx`` protos, numpy initializers).

:func:`clean_qdq` turns what ``torch.onnx.export`` writes into the deployable form: constants as
initializers, no ``Identity`` or no-op ``Cast``, BatchNorm folded into the integer weights of the preceding
convolution (exactly: per-channel scales times |γ/σ|, codes negated where γ/σ < 0), unused initializers gone.
:func:`detq_hooks.onnx_ort.make_ort_units` adds what onnxruntime needs to fuse ``QLinearConv`` (a ``QuantizeLinear`` on every
quantized Conv's output, int32 biases). :func:`pack_int4_weights` stores ≤ 4-bit weight codes as ``INT4``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import numpy as np


class Graph:
    """Producer/consumer index over an ``onnx.GraphProto`` with numpy access to initializers."""

    def __init__(self, model) -> None:
        self.model = model
        self.g = model.graph
        self.reindex()

    def reindex(self) -> None:
        from onnx import numpy_helper

        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in self.g.output}
        self._np = numpy_helper

    def array(self, name: str) -> Optional[np.ndarray]:
        t = self.inits.get(name)
        return None if t is None else self._np.to_array(t)

    def set_init(self, name: str, value: np.ndarray) -> str:
        t = self._np.from_array(np.array(value, copy=True, order="C"), name)  # keeps 0-d scalars 0-d
        if name in self.inits:
            self.inits[name].CopyFrom(t)
        else:
            self.g.initializer.append(t)
            self.inits[name] = self.g.initializer[-1]
        return name

    def fresh(self, base: str) -> str:
        i, name = 0, base
        taken = set(self.inits) | set(self.producer) | {v.name for v in self.g.input}
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        return name

    def rename_input(self, old: str, new: str) -> None:
        for n in list(self.consumers.get(old, [])):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new
        for o in self.g.output:
            if o.name == old:
                o.name = new

    def remove_nodes(self, nodes: Iterable) -> None:
        # delete in place, by index: re-adding would copy the messages and orphan references held by callers
        drop = {id(n) for n in nodes}
        for i in reversed([i for i, n in enumerate(self.g.node) if id(n) in drop]):
            del self.g.node[i]
        self.reindex()

    def prune(self) -> None:
        """Drop nodes whose outputs nobody reads, then unused initializers."""
        while True:
            dead = [n for n in self.g.node
                    if all(o not in self.outputs and not self.consumers.get(o) for o in n.output)]
            if not dead:
                break
            self.remove_nodes(dead)
        used = {i for n in self.g.node for i in n.input} | self.outputs
        for i in reversed([i for i, t in enumerate(self.g.initializer) if t.name not in used]):
            del self.g.initializer[i]
        self.reindex()


def constants_to_initializers(gr: Graph) -> None:
    from onnx import numpy_helper

    nodes = []
    for n in gr.g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            gr.set_init(n.output[0], numpy_helper.to_array(n.attribute[0].t))
            nodes.append(n)
    gr.remove_nodes(nodes)


def remove_identities(gr: Graph, elem_types: dict[str, int]) -> None:
    """Remove ``Identity`` nodes and ``Cast`` nodes whose input already has the target type."""
    for n in list(gr.g.node):
        noop = n.op_type == "Identity" or (
            n.op_type == "Cast" and elem_types.get(n.input[0]) is not None
            and elem_types.get(n.input[0]) == next(a.i for a in n.attribute if a.name == "to")
        )
        if not noop:
            continue
        src, dst = n.input[0], n.output[0]
        if dst in gr.outputs:
            if src in gr.outputs or src in {v.name for v in gr.g.input} or src in gr.inits:
                continue
            # keep the graph output name: rename the producer's output instead
            prod = gr.producer[src]
            for k, o in enumerate(prod.output):
                if o == src:
                    prod.output[k] = dst
            gr.rename_input(src, dst)
        else:
            for c in list(gr.consumers.get(dst, [])):
                for k, i in enumerate(c.input):
                    if i == dst:
                        c.input[k] = src
        gr.remove_nodes([n])


def _elem_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    return types


def weight_dq(gr: Graph, conv) -> Optional[object]:
    """The ``DequantizeLinear`` node reading constant integer codes that feeds ``conv``'s weight, if any."""
    if len(conv.input) < 2:
        return None
    dq = gr.producer.get(conv.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in gr.inits:
        return None
    if len(gr.consumers[dq.output[0]]) != 1:
        return None
    return dq


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _set_axis(node, axis: int) -> None:
    from onnx import helper

    for a in node.attribute:
        if a.name == "axis":
            a.i = axis
            return
    node.attribute.append(helper.make_attribute("axis", axis))


def fold_batchnorm(gr: Graph) -> int:
    """Fold ``Conv(DQ(codes, s)) → BatchNormalization`` into ``Conv(DQ(±codes, s·|k|), bias')``; returns count."""
    folded = 0
    for bn in list(gr.g.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = gr.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(gr.consumers[conv.output[0]]) != 1:
            continue
        dq = weight_dq(gr, conv)
        params = [gr.array(i) for i in bn.input[1:5]]
        if dq is None or any(p is None for p in params):
            continue
        codes, scale = gr.array(dq.input[0]), gr.array(dq.input[1])
        zp = gr.array(dq.input[2]) if len(dq.input) > 2 else None
        if scale is None or (zp is not None and np.any(zp != 0)) or scale.size not in (1, codes.shape[0]):
            continue
        if scale.ndim == 0 or scale.size != codes.shape[0]:  # per-tensor weight: becomes per-channel
            scale = np.full(codes.shape[0], float(scale.reshape(-1)[0]), np.float32)
        elif _axis(dq) != 0:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        k = gamma / np.sqrt(var + eps)
        bias = gr.array(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        sign = np.where(k < 0, -1, 1).reshape(-1, *([1] * (codes.ndim - 1)))
        # fresh initializers: the exporter may share identical constants between layers
        base = conv.output[0]
        new_inputs = [
            gr.set_init(gr.fresh(base + "_wq"), (codes.astype(np.int16) * sign).astype(codes.dtype)),
            gr.set_init(gr.fresh(base + "_ws"), (scale.astype(np.float64) * np.abs(k)).astype(np.float32)),
            gr.set_init(gr.fresh(base + "_wz"), np.zeros(codes.shape[0], codes.dtype)),
        ]
        del dq.input[:]
        dq.input.extend(new_inputs)
        _set_axis(dq, 0)
        bname = gr.fresh(conv.output[0] + "_bias")
        gr.set_init(bname, ((bias - mean) * k + beta).astype(np.float32))
        if len(conv.input) > 2:
            conv.input[2] = bname
        else:
            conv.input.append(bname)
        out = bn.output[0]
        conv.output[0] = out
        gr.remove_nodes([bn])
        folded += 1
    return folded


def clean_qdq(model) -> dict[str, int]:
    """The deployable QDQ graph (in place); returns what was done."""
    gr = Graph(model)
    constants_to_initializers(gr)
    remove_identities(gr, _elem_types(model))
    folded = fold_batchnorm(gr)
    gr.prune()
    return {"batchnorm_folded": folded}


def _qdq_key(gr: Graph, node) -> Optional[tuple]:
    """What makes two ``QuantizeLinear``/``DequantizeLinear`` nodes compute the same thing: the op, the data
    input, the constant scale and zero point by value, the axis. ``None`` for non-constant parameters."""
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
        return None
    params = []
    for name in node.input[1:3]:
        a = gr.array(name)
        if a is None:
            return None
        params.append((a.dtype.str, a.shape, a.tobytes()))
    return (node.op_type, node.input[0], tuple(params), _axis(node) if params[0][1] else None)


def _param_key(key: tuple) -> tuple:
    return (key[2], key[3])


def _merge_duplicate_qdq(gr: Graph) -> int:
    """Q (or DQ) nodes that read the same tensor with the same constants become one; returns how many went."""
    seen: dict[tuple, object] = {}
    dropped = []
    for node in list(gr.g.node):
        key = _qdq_key(gr, node)
        if key is None or node.output[0] in gr.outputs:
            continue
        if key in seen:
            gr.rename_input(node.output[0], seen[key].output[0])
            dropped.append(node)
        else:
            seen[key] = node
    if dropped:
        gr.remove_nodes(dropped)
    return len(dropped)


def _nearest_resize(node) -> bool:
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return mode == b"nearest"


# ops whose outputs are values of their data input(s) (input 0; every input of Concat), unchanged
_SELECTIONS = ("Concat", "Split", "Slice", "MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze",
               "Unsqueeze")


def _one_quantizer_after(gr: Graph, node) -> tuple[list, Optional[tuple]]:
    """``(readers, key)`` when ``node`` is a selection whose outputs (none a graph output) are read only by
    ``QuantizeLinear`` nodes with one set of constants; ``key`` is ``None`` otherwise."""
    if node.op_type not in _SELECTIONS or (node.op_type == "Resize" and not _nearest_resize(node)) or \
            any(o in gr.outputs for o in node.output):
        return [], None
    readers = [c for o in node.output for c in gr.consumers.get(o, [])]
    keys = [_qdq_key(gr, c) for c in readers]
    if not readers or any(k is None or k[0] != "QuantizeLinear" for k in keys) or \
            len({_param_key(k) for k in keys}) != 1:
        return readers, None
    return readers, keys[0]


def _selected_inputs(node) -> list[str]:
    """The inputs whose values a selection passes on: every input of ``Concat``, else the first."""
    return list(node.input) if node.op_type == "Concat" else list(node.input[:1])


def _hoist_quantizers(gr: Graph) -> int:
    """Put the one ``Q→DQ`` that every output of a selection (``Concat``, ``Split``, ``Slice``, ``MaxPool``,
    nearest ``Resize``, reshapes) goes through on that op's data inputs too; the one on the outputs stays (it is
    then an identity, and onnxruntime runs the op on integers between the two). Exact: these ops only select or
    join values, and per-tensor quantization is monotone. A quantizer behind a ``Clip`` (fewer than 8 bits) is
    not moved. Returns how many ops were done."""
    from onnx import helper

    done = 0
    for node in list(gr.g.node):
        readers, key = _one_quantizer_after(gr, node)
        if key is None or any(not gr.consumers.get(o) for o in node.output):
            continue
        q = readers[0]
        data = _selected_inputs(node)
        if all(_already_on_grid(gr, x, key) for x in data):
            continue
        dq_after = [c for c in gr.consumers[q.output[0]] if c.op_type == "DequantizeLinear"]
        if not dq_after:
            continue
        for k, x in enumerate(node.input):
            if x not in data or _already_on_grid(gr, x, key):
                continue
            q_out, dq_out = gr.fresh(x + "_hq"), gr.fresh(x + "_hdq")
            gr.g.node.append(helper.make_node("QuantizeLinear", [x, *q.input[1:]], [q_out], name=q_out,
                                              **_axis_attr(q)))
            gr.g.node.append(helper.make_node("DequantizeLinear", [q_out, *dq_after[0].input[1:]], [dq_out],
                                              name=dq_out, **_axis_attr(dq_after[0])))
            node.input[k] = dq_out
        gr.reindex()
        done += 1
    return done


def _axis_attr(node) -> dict:
    return {a.name: a.i for a in node.attribute if a.name == "axis"}


def _already_on_grid(gr: Graph, x: str, key: tuple) -> bool:
    """Whether ``x`` is the output of a ``DequantizeLinear`` of a ``QuantizeLinear`` with the constants ``key``."""
    dq = gr.producer.get(x)
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    q = gr.producer.get(dq.input[0])
    qk = _qdq_key(gr, q) if q is not None else None
    return qk is not None and _param_key(qk) == _param_key(key)


def drop_requantizers_after_selections(model) -> int:
    """Remove the ``Q→DQ`` after a selection whose inputs are all dequantized with those same constants (in
    place; returns how many ``DequantizeLinear`` readers now read the selection directly). The values are on that
    grid already, so it is an identity; OpenVINO propagates the inputs' dequantization through the selection
    into the next convolution by itself and runs the extra pair as a float node (onnxruntime needs the pair to
    fuse ``QLinearConcat``, so its target keeps it)."""
    gr = Graph(model)
    dropped = 0
    for node in list(gr.g.node):
        readers, key = _one_quantizer_after(gr, node)
        if key is None or not all(_already_on_grid(gr, x, key) for x in _selected_inputs(node)):
            continue
        for q in readers:
            for dq in list(gr.consumers.get(q.output[0], [])):
                if dq.op_type == "DequantizeLinear" and dq.output[0] not in gr.outputs and \
                        _param_key(_qdq_key(gr, dq)) == _param_key(key):
                    gr.rename_input(dq.output[0], q.input[0])
                    dropped += 1
        gr.reindex()
    gr.prune()
    return dropped


def _dequantized(gr: Graph, x: str) -> bool:
    dq = gr.producer.get(x)
    return dq is not None and dq.op_type == "DequantizeLinear"


def _pair_reading(gr: Graph, x: str) -> Optional[tuple]:
    """``(Q, DQ)`` of a per-tensor, constant ``QuantizeLinear`` that reads ``x`` and is dequantized right after
    (no ``Clip`` between: an 8-bit grid); ``None`` if ``x`` has none."""
    for q in gr.consumers.get(x, []):
        key = _qdq_key(gr, q)
        if key is None or key[0] != "QuantizeLinear" or key[3] is not None:
            continue
        dq = next((d for d in gr.consumers.get(q.output[0], []) if d.op_type == "DequantizeLinear"), None)
        if dq is not None:
            return q, dq
    return None


def _sum_quantizer(gr: Graph, add) -> Optional[tuple]:
    """``(Q, DQ)`` that quantizes the output of ``add``: read by per-tensor quantizers only (one set of constants),
    directly or through one selection (a ``Concat`` of it and other tensors)."""
    out = add.output[0]
    readers = gr.consumers.get(out, [])
    if out in gr.outputs or not readers:
        return None
    if len(readers) == 1 and readers[0].op_type in _SELECTIONS:
        readers, key = _one_quantizer_after(gr, readers[0])
        if key is None:
            return None
        source = readers[0].input[0]
    else:
        source = out
    keys = [_qdq_key(gr, r) for r in readers]
    if any(k is None or k[0] != "QuantizeLinear" for k in keys) or len({_param_key(k) for k in keys}) != 1:
        return None
    return _pair_reading(gr, source)


def integer_adds(model) -> int:
    """Put both inputs of each ``Add`` whose sum is quantized on an 8-bit grid (in place; returns how many
    inputs were changed), so that OpenVINO runs the residual adds of a bottleneck on integers and fuses the
    quantizers into the convolutions that produce them, as it does for models quantized by NNCF.

    An input that the model already quantizes for another layer (the skip input of a residual block, which the
    block's first convolution quantizes) is read through that quantizer: its trained scale. Any other input
    (the block's last activation) is put on the grid of the sum's own quantizer. Not exact, unlike the other
    passes: the fake-quant model adds the float values and rounds once, here each input is rounded first (at
    most half a step of its grid more per element). Adds with a constant input, or whose sum stays float, are
    left alone."""
    from onnx import helper

    gr = Graph(model)
    types = _elem_types(model)
    changed = 0
    # last first: once a later residual add reads its skip input through a quantizer, the earlier add whose sum
    # that is has only quantizers as readers
    for node in reversed(list(gr.g.node)):
        if node.op_type != "Add" or len(node.input) != 2 or any(i in gr.inits for i in node.input) or \
                any(types.get(i) != 1 for i in node.input):  # 1: FLOAT
            continue
        target = _sum_quantizer(gr, node)
        if target is None:
            continue
        for k, x in enumerate(node.input):
            if _dequantized(gr, x):
                continue
            pair = _pair_reading(gr, x)
            if pair is None:
                q, dq = target
                q_out, dq_out = gr.fresh(x + "_aq"), gr.fresh(x + "_adq")
                gr.g.node.append(helper.make_node("QuantizeLinear", [x, *q.input[1:]], [q_out], name=q_out))
                gr.g.node.append(helper.make_node("DequantizeLinear", [q_out, *dq.input[1:]], [dq_out], name=dq_out))
                node.input[k] = dq_out
            else:
                node.input[k] = pair[1].output[0]
            changed += 1
            gr.reindex()
    toposort(gr)
    gr.reindex()
    gr.prune()
    return changed


def share_activation_qdq(model, hoist: bool = True) -> dict[str, int]:
    """One ``Q→DQ`` per tensor where it is produced (in place): duplicate quantizers of one tensor merged and,
    with ``hoist``, the quantizer after a selection (``Concat``, ``Split``, ``Slice``, ``MaxPool``, nearest
    ``Resize``, reshapes) also put on its inputs, so that a tensor the layers of a shared quantizer
    (``quantization.shared_activations``) read is quantized once, right after the layer that makes it: what
    OpenVINO fuses into that convolution and onnxruntime into ``QLinear*`` units. Exact: the graph computes the
    same values. (Without shared quantizers the inputs of a ``Concat`` are mostly read by other layers' quantizers
    too, so hoisting would add quantizers rather than move them; the export then only merges.)"""
    gr = Graph(model)
    merged = hoisted = 0
    while True:
        m = _merge_duplicate_qdq(gr)
        h = _hoist_quantizers(gr) if hoist else 0
        merged, hoisted = merged + m, hoisted + h
        if not m and not h:
            break
    toposort(gr)
    gr.reindex()
    gr.prune()
    return {"merged": merged, "hoisted": hoisted}


def toposort(gr: Graph) -> None:
    """Reorder nodes topologically (the appended nodes must precede their consumers)."""
    available = {i.name for i in gr.g.input} | set(gr.inits) | {""}
    pending = list(gr.g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a missing input near {rest[0].name!r}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del gr.g.node[:]
    gr.g.node.extend(copies)


def _integer_types() -> set:
    from onnx import TensorProto as T

    return {T.INT8, T.UINT8, T.INT4, T.UINT4, T.INT16, T.UINT16, T.INT32}


def is_quantized_conv(gr: Graph, conv) -> bool:
    """A Conv whose data input and weight both come from ``DequantizeLinear`` (weight from constant codes)."""
    if conv.op_type != "Conv":
        return False
    src = gr.producer.get(conv.input[0])
    return src is not None and src.op_type == "DequantizeLinear" and weight_dq(gr, conv) is not None


def graph_summary(model) -> dict:
    """Op counts, integer/float initializer bytes and the number of quantized convolutions."""
    from collections import Counter

    from onnx import TensorProto

    gr = Graph(model)
    ints = _integer_types()
    counts = Counter(n.op_type for n in gr.g.node)
    int_bytes = float_bytes = 0
    for t in gr.g.initializer:
        n = len(t.raw_data) if t.raw_data else gr.array(t.name).nbytes
        if t.data_type in ints:
            int_bytes += n
        elif t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            float_bytes += n
    return {
        **{k: counts.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear", "Conv", "Clip", "Round", "Cast")},
        "ops": dict(counts),
        "integer_bytes": int_bytes,
        "float_bytes": float_bytes,
        "quantized_convs": sum(is_quantized_conv(gr, n) for n in gr.g.node),
    }


def _pack4(values: np.ndarray) -> bytes:
    """Two's-complement nibbles, element 2i in the low half of byte i (ONNX's INT4 layout)."""
    flat = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def pack_int4_weights(model, bit_widths: set) -> int:
    """Store weight codes that fit in [-8, 7] as ``INT4`` (two per byte, exact); returns how many tensors."""
    from onnx import TensorProto, helper

    if not bit_widths:
        return 0
    gr = Graph(model)
    packed = 0
    for dq in list(gr.g.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in gr.inits:
            continue
        codes = gr.array(dq.input[0])
        if codes.dtype != np.int8 or codes.ndim < 2 or codes.min() < -8 or codes.max() > 7:
            continue
        if len(gr.consumers[dq.input[0]]) != 1:
            continue
        zp = gr.array(dq.input[2]) if len(dq.input) > 2 else np.zeros(1, np.int8)
        qname, zname = gr.fresh(dq.input[0] + "_int4"), gr.fresh(dq.output[0] + "_zp_int4")
        gr.g.initializer.append(helper.make_tensor(qname, TensorProto.INT4, codes.shape, _pack4(codes), raw=True))
        gr.g.initializer.append(helper.make_tensor(zname, TensorProto.INT4, zp.shape, _pack4(zp), raw=True))
        dq.input[0] = qname
        if len(dq.input) > 2:
            dq.input[2] = zname
        else:
            dq.input.append(zname)
        gr.reindex()
        packed += 1
    gr.prune()
    return packed


__all__ = ["Graph", "clean_qdq", "fold_batchnorm", "graph_summary", "pack_int4_weights", "is_quantized_conv"]
