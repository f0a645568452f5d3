"""Leaner ONNX graphs for CNN2: Keras's nearest up-sampling, as tf2onnx writes it, replaced by one broadcast.

tf2onnx turns each `UpSampling3D` into three repeats (one per axis), each an Unsqueeze, a Tile and a Reshape
with its own shape arithmetic, and layout Transposes around them: every step writes a new tensor of up to
eight times the layer's input. One Unsqueeze -> Expand -> Reshape computes the same values (an exact copy,
no arithmetic) with one such tensor; at 64 x 64 x 48 a cord network call peaks about 20 MB lower.

    python -m cordseg.training.onnx_graph IN.onnx OUT.onnx   (a shipped model rewritten; outputs must match)

The exporter (training/export.py) applies it to every new graph before its parity check against Keras.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# the ops of tf2onnx's repeat chains (shape arithmetic included)
_CHAIN_OPS = {"Unsqueeze", "Tile", "Reshape", "Transpose", "Shape", "Gather", "Cast", "Slice", "Concat"}


def _run_shapes(proto, names) -> dict:
    """{tensor name: shape} of `names` in one run of the graph on a random input (dynamic sides as 1): tf2onnx's
    computed Reshape targets leave the chains' outputs unknown to ONNX shape inference."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], np.float32)
        values = sess.run(list(names), {inp.name: x})
    except Exception:  # a graph this cannot run is left alone
        return {}
    return {n: v.shape for n, v in zip(names, values)}


def _repeat_blocks(graph):
    """[(layer prefix, node indices, source tensor, result tensor)] for each up-sampling layer's repeat chain:
    the nodes whose outputs carry the layer's name with "/Repeat", the Transposes and shape reads tf2onnx put
    between them, and the source's own shape read; one tensor must enter the chain from outside and one leave
    it."""
    nodes = list(graph.node)
    prefixes = sorted({o.split("/Repeat")[0] for n in nodes for o in n.output if "/Repeat" in o})
    consumers: dict[str, set] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            consumers.setdefault(i, set()).add(k)
    constants = {i.name for i in graph.initializer}
    graph_outputs = {g.name for g in graph.output}
    blocks = []
    for prefix in prefixes:
        chain = {k for k, n in enumerate(nodes) if any(o.startswith(prefix + "/Repeat") for o in n.output)}
        names = {o for k in chain for o in nodes[k].output}
        for k, n in enumerate(nodes):  # layout transposes and shape reads between the steps (tf2onnx's names)
            if k not in chain and n.op_type in ("Transpose", "Shape", "Gather", "Cast") and \
                    any(i in names for i in n.input):
                chain.add(k)
                names.update(n.output)
        for k, n in enumerate(nodes):  # the source's shape read, which feeds the chain only
            if k not in chain and n.op_type in ("Shape", "Gather", "Cast") and n.output and \
                    all(consumers.get(o) and consumers[o] <= chain for o in n.output):
                chain.add(k)
                names.update(n.output)
        if any(nodes[k].op_type not in _CHAIN_OPS for k in chain):
            continue
        inputs = {i for k in chain for i in nodes[k].input if i and i not in names and i not in constants}
        outputs = {o for k in chain for o in nodes[k].output
                   if (consumers.get(o, set()) - chain) or o in graph_outputs}
        if len(inputs) == 1 and len(outputs) == 1:
            blocks.append((prefix, chain, inputs.pop(), outputs.pop()))
    return blocks


def simplify_upsampling(proto) -> int:
    """Rewrite `proto` (an onnx.ModelProto, in place): every nearest up-sampling chain whose input and output
    shapes show an integer factor on the last three axes (channels first) becomes Unsqueeze -> Expand ->
    Reshape. Chains it cannot read are left as they are. Returns how many were replaced."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    blocks = _repeat_blocks(graph)
    shapes = _run_shapes(proto, sorted({t for _, _, s, d in blocks for t in (s, d)})) if blocks else {}
    first: dict[int, list] = {}  # index of a chain's first node -> the nodes that take the chain's place
    drop: set = set()
    for prefix, chain, src, dst in blocks:
        a, b = shapes.get(src), shapes.get(dst)
        if a is None or b is None or len(a) != 5 or len(b) != 5 or a[:2] != b[:2]:
            continue
        factors = [bb // aa if aa and bb % aa == 0 else 0 for aa, bb in zip(a[2:], b[2:])]
        if not all(factors):
            continue
        key = prefix.replace("/", "_") + "_nearest"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([3, 5, 7], np.int64), key + "_axes"),
            numpy_helper.from_array(np.array([1, 1, 1, factors[0], 1, factors[1], 1, factors[2]], np.int64),
                                    key + "_repeats"),
            numpy_helper.from_array(np.array([1, 1] + factors, np.int64), key + "_factors"),
        ])
        first[min(chain)] = [
            helper.make_node("Unsqueeze", [src, key + "_axes"], [key + "_unsqueezed"], name=key + "_unsqueeze"),
            helper.make_node("Expand", [key + "_unsqueezed", key + "_repeats"], [key + "_expanded"],
                             name=key + "_expand"),
            helper.make_node("Shape", [src], [key + "_shape"], name=key + "_shape"),
            helper.make_node("Mul", [key + "_shape", key + "_factors"], [key + "_target"], name=key + "_mul"),
            helper.make_node("Reshape", [key + "_expanded", key + "_target"], [dst], name=key + "_reshape"),
        ]
        drop |= chain
    if not first:
        return 0
    rebuilt = []
    for k, n in enumerate(graph.node):
        rebuilt.extend(first.get(k, []))
        if k not in drop:
            rebuilt.append(n)
    del graph.node[:]
    graph.node.extend(rebuilt)
    _prune(graph)
    onnx.checker.check_model(proto)
    return len(first)


def _prune(graph) -> None:
    """Drop nodes whose outputs nothing uses (the shape arithmetic of replaced chains), and unused constants."""
    needed = {o.name for o in graph.output}
    kept = []
    for n in reversed(list(graph.node)):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


DYNAMIC_SIDES = (40, 64, 104)  # sizes tried for dynamic spatial sides (multiples of 8), mixed


def same_outputs(model_a, model_b, *, seed: int = 0) -> float:
    """Largest absolute difference between two ONNX models' outputs (files, or serialised bytes) on random
    inputs: the first's shape, its dynamic batch as 2 and its dynamic spatial sides at the sizes of
    DYNAMIC_SIDES in turn (not square)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    sessions = [ort.InferenceSession(m if isinstance(m, bytes) else str(m), providers=["CPUExecutionProvider"])
                for m in (model_a, model_b)]
    dims = sessions[0].get_inputs()[0].shape
    worst = 0.0
    for j in range(len(DYNAMIC_SIDES) if any(not isinstance(d, int) for d in dims[1:]) else 1):
        shape = [dims[0] if isinstance(dims[0], int) else 2]
        for t, d in enumerate(dims[1:]):
            shape.append(d if isinstance(d, int) else DYNAMIC_SIDES[(j + t) % len(DYNAMIC_SIDES)])
        x = rng.normal(size=shape).astype(np.float32)
        ya, yb = (s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions)
        if ya.shape != yb.shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(ya - yb))))
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cordseg.training.onnx_graph", description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    import onnx

    from cordseg.io import write_bytes_atomic

    try:
        proto = onnx.load(str(a.source))
    except Exception as exc:
        print(f"error: cannot read {a.source}: {exc}", file=sys.stderr)
        return 2
    n = simplify_upsampling(proto)
    if not n:
        print(f"{a.source.name}: no up-sampling chain to replace; nothing written", file=sys.stderr)
        return 1
    data = proto.SerializeToString()
    diff = same_outputs(a.source, data)
    if diff != 0.0:  # the rewrite only moves values: anything but identical outputs is a wrong graph
        print(f"error: the rewritten graph's outputs differ by {diff:.3g}; nothing written", file=sys.stderr)
        return 2
    write_bytes_atomic(data, a.out)
    print(f"wrote {a.out}: {n} up-sampling chains replaced, outputs identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
