"""A CPU-fast ONNX graph for CharRNN, built by hand from the weights (the `loop` graph).

Same inputs and outputs as the exported `model.onnx` (docs/artifact.md), plus a `positions`
input (bool scalar; false skips position_logits, returned as (B, 0, V)), and different
arithmetic:

- The embedding is folded into layer 0's input projection: one (V, G*H) lookup table,
  `embed.weight @ W_ih0^T + b`, so layer 0 does no input GEMM at run time.
- Every other layer's input projection for all time steps is one (T*B, H) x (H, G*H) GEMM.
- Each layer's recurrence is an ONNX `Loop` over time whose body is one (B, H) x (H, G*H)
  GEMM plus the cell's element-wise math. Rows past their length keep their state (`Where` on a
  (T, B, 1) mask), so each row's final state is its state after its own last character.

Measured on the 2-core CPU machine (docs/benchmarks.md): ORT runs this 2-2.6x faster than its own
RNN kernel at batch >= 16, because the RNN kernel does not batch its GEMMs well. On CUDA the
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


def _cell_body(cell: str, layer: int, x: str, hidden: int) -> onnx.GraphProto:
    """Loop body: (i, cond, h[, c]) -> (cond, h'[, c'], h' as scan output)."""
    g = _Graph()
    lstm = cell == "lstm"
    n = g.node
    xt = n("Gather", [x, "i"], [f"xt{layer}"], axis=0)  # (B, G*H)
    hw = n("MatMul", ["h_in", f"whh{layer}"], [f"hw{layer}"])  # (B, G*H)
    m = n("Gather", ["mask", "i"], [f"m{layer}"], axis=0)  # (B, 1) bool
    if cell == "rnn":
        pre = n("Add", [xt, hw], [f"pre{layer}"])
        h_new = n("Tanh", [pre], [f"hn{layer}"])
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
        h_new = n("Add", [cand, n("Mul", [z, diff], [f"zd{layer}"])], [f"hn{layer}"])
    else:  # lstm
        gates = n("Add", [xt, hw], [f"gates{layer}"])
        gi, gf, gg, go = (f"gi{layer}", f"gf{layer}", f"gg{layer}", f"go{layer}")
        n("Split", [gates, "split4"], [gi, gf, gg, go], axis=1)
        i_ = n("Sigmoid", [gi], [f"i_{layer}"])
        f_ = n("Sigmoid", [gf], [f"f_{layer}"])
        o_ = n("Sigmoid", [go], [f"o_{layer}"])
        c_new = n("Add", [n("Mul", [f_, "c_in"], [f"fc{layer}"]),
                          n("Mul", [i_, n("Tanh", [gg], [f"tg{layer}"])], [f"ig{layer}"])],
                  [f"cn{layer}"])
        h_new = n("Mul", [o_, n("Tanh", [c_new], [f"tc{layer}"])], [f"hn{layer}"])
        n("Where", [m, c_new, "c_in"], ["c_out"])
    n("Where", [m, h_new, "h_in"], ["h_out"])
    n("Identity", ["cond_in"], ["cond_out"])
    n("Identity", ["h_out"], ["h_scan"])
    f = TensorProto.FLOAT
    inputs = [oh.make_tensor_value_info("i", TensorProto.INT64, []),
              oh.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
              oh.make_tensor_value_info("h_in", f, ["B", hidden])]
    outputs = [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
               oh.make_tensor_value_info("h_out", f, ["B", hidden])]
    if lstm:
        inputs.append(oh.make_tensor_value_info("c_in", f, ["B", hidden]))
        outputs.append(oh.make_tensor_value_info("c_out", f, ["B", hidden]))
    outputs.append(oh.make_tensor_value_info("h_scan", f, ["B", hidden]))
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

    finals_h: list[str] = []
    finals_c: list[str] = []
    for layer in range(L):
        g.const(f"whh{layer}", _f32(getattr(rnn, f"weight_hh_l{layer}")).T.copy())
        if cell == "gru":
            g.const(f"bhh{layer}", _f32(getattr(rnn, f"bias_hh_l{layer}")))
        h0 = n("Gather", ["state", g.const(f"sh{layer}", np.array(layer, np.int64))], [f"h0_{layer}"], axis=0)
        loop_in = ["T", "", h0]
        loop_out = [f"hT{layer}"]
        if cell == "lstm":
            c0 = n("Gather", ["state", g.const(f"sc{layer}", np.array(L + layer, np.int64))],
                   [f"c0_{layer}"], axis=0)
            loop_in.append(c0)
            loop_out.append(f"cT{layer}")
            finals_c.append(f"cT{layer}")
        loop_out.append(f"hs{layer}")  # (T, B, H) scan output
        n("Loop", loop_in, loop_out, body=_cell_body(cell, layer, x, H))
        finals_h.append(f"hT{layer}")
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
