"""The QDQ units onnxruntime's CPU provider fuses into ``QLinearConv`` (``export_onnx(target="onnxruntime")``).

onnxruntime fuses a Conv only as ``DQ(x), DQ(w), DQ(int32 bias) → Conv → Q`` where the ``Q`` consumes every
output edge of the Conv. The clean QDQ graph quantizes layer *inputs* (as training simulated), so a Conv's
output goes to SiLU in float. This pass adds, for every quantized Conv,

* a requantizer on its output: ``Conv → QuantizeLinear → DequantizeLinear`` with an asymmetric uint8 scale
  calibrated on the user's inputs (min/max of that output over the calibration batches);
* its bias as ``int32`` codes at scale ``s_x · s_w`` behind a ``DequantizeLinear``.

and then, for every SiLU on such an output (``Sigmoid`` and ``Mul`` reading the requantized Conv output) whose
product only the next layers' own ``QuantizeLinear`` read (one scale; duplicates merged, so the ``Q`` consumes the
``Mul``'s only edge), the units onnxruntime runs as ``QLinearSigmoid`` and ``QLinearMul``: the sigmoid's output in
uint8 at scale 1/255 (its range is [0, 1]), the product straight into that ``Q``. Between two such convolutions
the activations stay uint8, where the float path dequantized every Conv output to run SiLU in float.

A SiLU whose product float ops read (``Concat``, ``Split``, ``MaxPool``, residual ``Add``) stays float: a
requantizer there would round the tensor once more than the fake-quant model does (tried: the exported mAP
moved further from PyTorch's). ``Concat``, ``Split``, ``MaxPool``, ``Resize``, ``Add`` and the box decode stay
float between the integer units where onnxruntime does not fuse them itself; the next layer's own
``QuantizeLinear`` (trained) quantizes its input. The numerical changes against the fake-quant model are the
8-bit rounding of each Conv output, of each fused sigmoid, and each bias's int32 rounding, which the export
test bounds.
"""

from __future__ import annotations

import numpy as np

from .onnx_graph import Graph, is_quantized_conv, toposort, weight_dq


def _conv_output_ranges(model, names: list[str], calibration_inputs) -> dict[str, tuple[float, float]]:
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for n in names:
        if n not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in sess.get_inputs()]
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for batch in calibration_inputs:
        feed = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.float32)
                for k, v in zip(in_names, batch)}
        outs = sess.run(names, feed)
        for n, o in zip(names, outs):
            lo[n] = min(lo[n], float(o.min()))
            hi[n] = max(hi[n], float(o.max()))
    return {n: (lo[n], hi[n]) for n in names}


def _uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zp)


def make_ort_units(model, calibration_inputs) -> list[str]:
    """Add the Conv-output requantizers and int32 biases, then the quantized SiLU units (in place); returns
    notes on what did not fuse."""
    from onnx import helper

    gr = Graph(model)
    convs = [n for n in gr.g.node if is_quantized_conv(gr, n)]
    notes = []
    ranges = _conv_output_ranges(model, [c.output[0] for c in convs], calibration_inputs)
    for conv in convs:
        out = conv.output[0]
        x_dq = gr.producer[conv.input[0]]
        s_x = gr.array(x_dq.input[1])
        w_dq = weight_dq(gr, conv)
        s_w = gr.array(w_dq.input[1])
        if s_x is None or s_x.size != 1 or s_w is None:
            notes.append(f"{conv.name}: input scale is not a per-tensor constant; left as a float Conv")
            continue
        if out in gr.outputs:
            notes.append(f"{conv.name}: its output is a graph output, so it stays a float Conv "
                         "(onnxruntime fuses only a Conv whose output a QuantizeLinear consumes)")
            continue
        # int32 bias at scale s_x * s_w (what QLinearConv adds to the int32 accumulator)
        if len(conv.input) > 2 and conv.input[2] in gr.inits:
            b = gr.array(conv.input[2]).astype(np.float64)
            bscale = (np.float32(s_x.reshape(())) * s_w.astype(np.float32).reshape(-1)).astype(np.float32)
            if bscale.size == 1:
                bscale = np.full(b.shape, bscale.reshape(())[()], np.float32)
            exact = np.round(b / bscale.astype(np.float64))
            if np.abs(exact).max(initial=0) > 2**31 - 1:
                notes.append(f"{conv.name}: bias / (input scale x weight scale) exceeds int32 (input scale "
                             f"{float(s_x.reshape(())):.3g}); bias kept float, so this Conv stays float in onnxruntime")
                continue
            codes = exact.astype(np.int32)
            base = out + "_bias"
            qn = gr.set_init(gr.fresh(base + "_q"), codes)
            sn = gr.set_init(gr.fresh(base + "_s"), bscale)
            zn = gr.set_init(gr.fresh(base + "_z"), np.zeros(b.shape, np.int32))
            bdq = gr.fresh(base + "_dq")
            node = helper.make_node("DequantizeLinear", [qn, sn, zn], [bdq], name=bdq, axis=0)
            conv.input[2] = bdq
            gr.g.node.append(node)
        # requantizer on the output, consuming its only edge
        _add_requantizer(gr, out, *_uint8_params(*ranges[out]), list(gr.consumers.get(out, [])))
    toposort(gr)
    gr.reindex()
    gr.prune()
    _quantize_silu(gr)
    return notes


def _add_requantizer(gr: Graph, out: str, scale, zp, consumers) -> None:
    """``out → QuantizeLinear → DequantizeLinear``, the ``consumers`` reading the dequantized copy."""
    from onnx import helper

    sn = gr.set_init(gr.fresh(out + "_oq_s"), np.array(scale, np.float32))
    zn = gr.set_init(gr.fresh(out + "_oq_z"), np.array(zp, np.uint8))
    q_out, dq_out = gr.fresh(out + "_oq"), gr.fresh(out + "_odq")
    gr.g.node.append(helper.make_node("QuantizeLinear", [out, sn, zn], [q_out], name=q_out))
    gr.g.node.append(helper.make_node("DequantizeLinear", [q_out, sn, zn], [dq_out], name=dq_out))
    _redirect(out, dq_out, consumers)


def _redirect(old: str, new: str, consumers) -> None:
    """The ``consumers`` read ``new`` where they read ``old``."""
    for c in consumers:
        for k, i in enumerate(c.input):
            if i == old:
                c.input[k] = new


def _silu_units(gr: Graph) -> list[tuple]:
    """``(Sigmoid, Mul)`` pairs computing SiLU of a requantized Conv output (``DequantizeLinear`` → both)."""
    units = []
    for dq in gr.g.node:
        if dq.op_type != "DequantizeLinear" or gr.producer.get(dq.input[0]) is None \
                or gr.producer[dq.input[0]].op_type != "QuantizeLinear":
            continue
        readers = gr.consumers.get(dq.output[0], [])
        sig = next((c for c in readers if c.op_type == "Sigmoid"), None)
        mul = next((c for c in readers if c.op_type == "Mul"), None)
        if len(readers) == 2 and sig is not None and mul is not None and \
                sorted(mul.input) == sorted([dq.output[0], sig.output[0]]) and mul.output[0] not in gr.outputs:
            units.append((sig, mul))
    return units


def _quantize_silu(gr: Graph) -> None:
    """Fuse the SiLUs whose product only the next layers' own quantizers read."""
    for sig, mul in _silu_units(gr):
        readers = list(gr.consumers.get(mul.output[0], []))
        constant = [q for q in readers if q.op_type == "QuantizeLinear" and len(q.input) == 3
                    and q.input[1] in gr.inits and q.input[2] in gr.inits]
        params = {(gr.array(q.input[1]).tobytes(), gr.array(q.input[2]).tobytes(), gr.array(q.input[2]).dtype.str)
                  for q in constant}
        if not readers or len(constant) != len(readers) or len(params) != 1:
            # float ops (Concat, Split, MaxPool, Add) read it: a requantizer here would round it once more than
            # the fake-quant model does (measured: mAP further from PyTorch's), so it stays float
            continue
        _add_requantizer(gr, sig.output[0], np.float32(1 / 255), np.uint8(0), [mul])  # sigmoid: [0, 1] in uint8
        keep = constant[0]  # one Q for all next layers (same scale), which onnxruntime fuses into QLinearMul
        for other in constant[1:]:
            _redirect(other.output[0], keep.output[0], gr.consumers.get(other.output[0], []))
    toposort(gr)
    gr.reindex()
    gr.prune()


__all__ = ["make_ort_units"]
