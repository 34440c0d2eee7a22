"""A CPU-fast ONNX graph for CharRNN, built by hand from the weights (the `loop` graph).

Same inputs and outputs as the exported `model.onnx` (docs/artifact.md), plus a `positions`
input (bool scalar; false skips position_logits, returned as (B, 0, V)), and different
arithmetic:

- The embedding is folded into layer 0's input projection: one (V, G*H) lookup table,
  `embed.weight @ W_ih0^T + b`, so layer 0 does no input GEMM at run time.
- Every other layer's input projection for all time steps is one (T*B, H) x (H, G*H) GEMM.
- Each layer's recurrence is an ONNX `Scan` over time whose body is one (B, H) x (H, G*H)
  GEMM plus the cell's element-wise math, nothing else. Every row runs all T steps; its final
  state is picked from the scan output at its own last step (GatherElements). An earlier version
  used `Loop` with a per-step length mask (`Gather` of x and mask, `Where`): that bookkeeping
  cost as much as the GEMMs at small batches; without it the graph is 2.2x faster at batch 1 and
  ~11% at batch 32 (docs/benchmarks.md).

Measured on the 2-core CPU machine (docs/benchmarks.md): ORT runs this 2-3.5x faster than its own
RNN kernel at batch >= 8, because the RNN kernel does not batch its GEMMs well. On CUDA the
standard graph (cuDNN RNN kernels) stays the better choice, so artifacts carry both.

G is 1 for rnn (tanh), 3 for gru (gates r, z, n) and 4 for lstm (gates i, f, g, o), as in torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from .model import CharRNN

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        # np.ascontiguousarray would turn a 0-d scalar into shape (1,); copy keeps the rank.
        self.inits.append(nh.from_array(np.array(value, order="C", copy=True), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: object) -> str:
        self.nodes.append(oh.make_node(op, inputs, outputs, **attrs))
        return outputs[0]


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _cell_body(cell: str, layer: int, hidden: int, gates: int) -> onnx.GraphProto:
    """Scan body: (h[, c], x_t) -> (h'[, c'], h' and [c'] as scan outputs).

    No length mask: every row runs all T steps, and a row's final state is read from the scan
    output at its own last step (build_loop_graph). An RNN is causal, so the steps past a row's
    length change nothing it returns; skipping the mask saves a Where and a Gather per step.
    """
    g = _Graph()
    lstm = cell == "lstm"
    n = g.node
    xt = "x_t"  # (B, G*H): this step's slice of the input projection
    hw = n("MatMul", ["h_in", f"whh{layer}"], [f"hw{layer}"])  # (B, G*H)
    if cell == "rnn":
        pre = n("Add", [xt, hw], [f"pre{layer}"])
        h_new = n("Tanh", [pre], ["h_out"])
    elif cell == "gru":
        hwb = n("Add", [hw, f"bhh{layer}"], [f"hwb{layer}"])
        xr, xz, xn = (f"xr{layer}", f"xz{layer}", f"xn{layer}")
        hr, hz, hn = (f"hr{layer}", f"hz{layer}", f"hn_{layer}")
        n("Split", [xt, "split3"], [xr, xz, xn], axis=1)
        n("Split", [hwb, "split3"], [hr, hz, hn], axis=1)
        r = n("Sigmoid", [n("Add", [xr, hr], [f"rs{layer}"])], [f"r{layer}"])
        z = n("Sigmoid", [n("Add", [xz, hz], [f"zs{layer}"])], [f"z{layer}"])
        cand = n("Tanh", [n("Add", [xn, n("Mul", [r, hn], [f"rh{layer}"])], [f"ns{layer}"])],
                 [f"nn{layer}"])
        # (1 - z) * n + z * h  ==  n + z * (h - n)
        diff = n("Sub", ["h_in", cand], [f"d{layer}"])
        h_new = n("Add", [cand, n("Mul", [z, diff], [f"zd{layer}"])], ["h_out"])
    else:  # lstm
        gates_ = n("Add", [xt, hw], [f"gates{layer}"])
        gi, gf, gg, go = (f"gi{layer}", f"gf{layer}", f"gg{layer}", f"go{layer}")
        n("Split", [gates_, "split4"], [gi, gf, gg, go], axis=1)
        i_ = n("Sigmoid", [gi], [f"i_{layer}"])
        f_ = n("Sigmoid", [gf], [f"f_{layer}"])
        o_ = n("Sigmoid", [go], [f"o_{layer}"])
        n("Add", [n("Mul", [f_, "c_in"], [f"fc{layer}"]),
                  n("Mul", [i_, n("Tanh", [gg], [f"tg{layer}"])], [f"ig{layer}"])], ["c_out"])
        h_new = n("Mul", [o_, n("Tanh", ["c_out"], [f"tc{layer}"])], ["h_out"])
        n("Identity", ["c_out"], ["c_scan"])
    n("Identity", [h_new], ["h_scan"])
    f = TensorProto.FLOAT
    state = [("h", ["B", hidden])] + ([("c", ["B", hidden])] if lstm else [])
    inputs = [oh.make_tensor_value_info(f"{v}_in", f, shape) for v, shape in state]
    inputs.append(oh.make_tensor_value_info("x_t", f, ["B", gates * hidden]))
    outputs = [oh.make_tensor_value_info(f"{v}_out", f, shape) for v, shape in state]
    outputs += [oh.make_tensor_value_info(f"{v}_scan", f, shape) for v, shape in state]
    return oh.make_graph(g.nodes, f"{cell}_step_l{layer}", inputs, outputs)


def build_loop_graph(model: CharRNN, opset: int = 17) -> onnx.ModelProto:
    cfg = model.config
    cell, L, H, V = cfg.cell, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    G = GATES[cell]
    rnn = model.rnn
    g = _Graph()
    n = g.node
    zero = g.const("zero", np.array(0, np.int64))
    one = g.const("one", np.array(1, np.int64))
    if G > 1:  # gate sizes for Split, referenced from the loop bodies
        g.const(f"split{G}", np.array([H] * G, np.int64))

    def input_bias(layer: int) -> np.ndarray:
        b = _f32(getattr(rnn, f"bias_ih_l{layer}"))
        if cell != "gru":  # gru's n-gate hidden bias sits inside r * (...): keep it in the loop
            b = b + _f32(getattr(rnn, f"bias_hh_l{layer}"))
        return b

    # Layer 0: embedding folded into the input projection, a (V, G*H) table.
    with torch.no_grad():
        table = _f32(model.embed.weight) @ _f32(rnn.weight_ih_l0).T + input_bias(0)
    g.const("table0", table.astype(np.float32))
    ids_tb = n("Transpose", ["ids"], ["ids_tb"], perm=[1, 0])  # (T, B)
    x = n("Gather", ["table0", ids_tb], ["x0"], axis=0)  # (T, B, G*H)
    t = n("Gather", [n("Shape", ["ids"], ["ids_shape"]), one], ["T"], axis=0)
    steps = n("Range", [zero, t, one], ["steps"])  # (T,)
    mask_tb = n("Less", [n("Unsqueeze", [steps, one], ["steps_col"]),
                         n("Unsqueeze", ["lengths", zero], ["len_row"])], ["mask_tb"])
    n("Unsqueeze", [mask_tb, g.const("last_axis", np.array([-1], np.int64))], ["mask"])

    # Each row's last step, (1, B, H) indices for GatherElements over a (T, B, H) scan output.
    last = n("Sub", ["lengths", one], ["last"])
    last_idx = n("Expand", [n("Reshape", [last, g.const("shape_1b1", np.array([1, -1, 1]))],
                              ["last_1b1"]),
                            g.const("shape_11h", np.array([1, 1, H]))], ["last_idx"])

    def final(seq: str) -> str:  # (T, B, H) -> (B, H): each row's state after its last step
        picked = n("GatherElements", [seq, last_idx], [f"{seq}_last"], axis=0)
        return n("Squeeze", [picked, g.const(f"{seq}_axis", np.array([0]))], [f"{seq}_final"])

    finals_h: list[str] = []
    finals_c: list[str] = []
    for layer in range(L):
        g.const(f"whh{layer}", _f32(getattr(rnn, f"weight_hh_l{layer}")).T.copy())
        if cell == "gru":
            g.const(f"bhh{layer}", _f32(getattr(rnn, f"bias_hh_l{layer}")))
        h0 = n("Gather", ["state", g.const(f"sh{layer}", np.array(layer, np.int64))], [f"h0_{layer}"], axis=0)
        scan_in = [h0]
        scan_out = [f"hT{layer}"]
        if cell == "lstm":
            c0 = n("Gather", ["state", g.const(f"sc{layer}", np.array(L + layer, np.int64))],
                   [f"c0_{layer}"], axis=0)
            scan_in.append(c0)
            scan_out.append(f"cT{layer}")
        scan_out.append(f"hs{layer}")  # (T, B, H) scan output
        if cell == "lstm":
            scan_out.append(f"cs{layer}")
        n("Scan", [*scan_in, x], scan_out, body=_cell_body(cell, layer, H, G), num_scan_inputs=1)
        finals_h.append(final(f"hs{layer}"))
        if cell == "lstm":
            finals_c.append(final(f"cs{layer}"))
        if layer + 1 < L:
            w = g.const(f"wih{layer + 1}", _f32(getattr(rnn, f"weight_ih_l{layer + 1}")).T.copy())
            b = g.const(f"bih{layer + 1}", input_bias(layer + 1))
            x = n("Add", [n("MatMul", [f"hs{layer}", w], [f"xp{layer + 1}"]), b], [f"x{layer + 1}"])

    state_parts = [n("Unsqueeze", [s, zero], [f"{s}_u"]) for s in finals_h + finals_c]
    n("Concat", state_parts, ["state_out"], axis=0)  # (S, B, H)
    wfc = g.const("wfc", _f32(model.head.weight).T.copy())
    bfc = g.const("bfc", _f32(model.head.bias))
    n("Add", [n("MatMul", [finals_h[-1], wfc], ["last_mm"]), bfc], ["logits"])  # (B, V)
    f = TensorProto.FLOAT
    # position_logits only when the `positions` input is true: ONNX Runtime computes every node
    # whether or not its output is fetched, and this (B, T, H) x (H, V) GEMM is ~10% of the
    # graph's time at B=32, T=64 (docs/benchmarks.md). When false the output is (B, 0, V).
    # A required input, not an overridable initializer: ORT warns about those at every load.
    then = _Graph()
    top_seq = then.node("Transpose", [f"hs{L - 1}"], ["hs_bt"], perm=[1, 0, 2])  # (B, T, H)
    pos = then.node("Add", [then.node("MatMul", [top_seq, wfc], ["pos_mm"]), bfc],
                    ["pos_logits"])  # (B, T, V)
    # Zero past each row's length, as the contract (and eager) promise.
    valid = then.node("Cast", [then.node("Transpose", ["mask"], ["mask_bt"], perm=[1, 0, 2])],
                      ["valid"], to=TensorProto.FLOAT)  # (B, T, 1)
    then.node("Mul", [pos, valid], ["pos_then"])
    batch = n("Gather", ["ids_shape", zero], ["B"], axis=0)
    n("Concat", [n("Unsqueeze", [batch, zero], ["B_1"]), g.const("zero_v", np.array([0, V]))],
      ["empty_shape"], axis=0)  # (B, 0, V)
    skip = _Graph()
    skip.node("ConstantOfShape", ["empty_shape"], ["pos_else"],
              value=nh.from_array(np.zeros(1, np.float32)))
    n("If", ["positions"], ["position_logits"],
      then_branch=oh.make_graph(then.nodes, "positions", [],
                                [oh.make_tensor_value_info("pos_then", f, ["B", "T", V])]),
      else_branch=oh.make_graph(skip.nodes, "no_positions", [],
                                [oh.make_tensor_value_info("pos_else", f, ["B", 0, V])]))

    S = cfg.state_layers
    graph = oh.make_graph(
        g.nodes, f"charrnn_{cell}_loop",
        [oh.make_tensor_value_info("ids", TensorProto.INT64, ["B", "T"]),
         oh.make_tensor_value_info("lengths", TensorProto.INT64, ["B"]),
         oh.make_tensor_value_info("state", f, [S, "B", H]),
         oh.make_tensor_value_info("positions", TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("logits", f, ["B", V]),
         oh.make_tensor_value_info("state_out", f, [S, "B", H]),
         oh.make_tensor_value_info("position_logits", f, ["B", "P", V])],
        g.inits,
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)],
                          producer_name="nextchar.training.onnx_loop")
    proto.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(proto, full_check=True)
    return proto
