"""Generates optimizers.json: weights after each step of MXNet 1.9.1's own Updater.

Run with MXNet 1.9.1 installed (pip install mxnet==1.9.1 numpy==1.23.5):

    python3 generate.py      # writes optimizers.json next to this script

Each case runs mx.optimizer.get_updater(mx.optimizer.create(name, **params)) for STEPS
updates of one key on a (3, 4) weight, with inputs from numpy.random.RandomState(seed).
Gradients are handed over as fresh copies (AdaDelta rescales its gradient in place).
A case with the option {"keys": K} (stored as "keys") updates keys 0..K-1 in turn at each
step, each from the same initial weight with the same gradient; its steps hold the K
weights one after the other (Nadam's momentum schedule is shared by all keys). With
{"updates": [[keys of step 1], [keys of step 2], ...]} (stored as "updates", one step per
list) only those keys are updated at each step, in that order, so that keys reach different
update counts: the learning-rate schedulers follow the largest count (MXNet's num_update),
bias corrections each key's own. {"steps": N} replaces the number of steps (5).

MXNet 1.9.1 has no `adamw` optimizer class; the `adamw` cases drive the 1.9.1 operator
mx.nd.contrib.adamw_update (mp_adamw_update with multi_precision) with eta = the learning
rate and lr = the bias correction sqrt(1 - beta2^t) / (1 - beta1^t), as kvstore-optimizer's
adamw does.

A case with the option {"grad_rows": [[rows of step 1], [rows of step 2], ...]} (stored as
"grad_rows", one step per list) hands the updater a row-sparse gradient holding exactly those
rows of the step's draw (an empty list: a gradient with no rows); its stored "grads" are the
draws with every other row zeroed, the dense arrays the gradients stand for. The option
{"shape": [rows, cols]} replaces the (3, 4) weight shape.

Inputs and outputs are stored as float64 lists of the exact values in each dtype. A case
MXNet itself rejects (e.g. a dtype an operator does not support) is stored with
"mxnet_error" instead of "steps".
"""
import json
import math
import os

import numpy as np
import mxnet as mx

STEPS = 5
SHAPE = (3, 4)
DTYPES = ["float32", "float64", "float16"]

SCHED = {"type": "factor", "step": 2, "factor": 0.5, "base_lr": 0.2}
WARM = {"type": "poly", "max_update": 8, "pwr": 2, "base_lr": 0.1, "final_lr": 0.01,
        "warmup_steps": 2, "warmup_begin_lr": 0.02, "warmup_mode": "linear"}
COS = {"type": "cosine", "max_update": 4, "base_lr": 0.05, "final_lr": 0.001}
MULTI = {"type": "multifactor", "step": [1, 3], "factor": 0.3, "base_lr": 0.1,
         "warmup_steps": 1, "warmup_begin_lr": 0.05, "warmup_mode": "constant"}

# (optimizer, params, dtypes[, options])
CASES = [
    ("sgd", {"learning_rate": 0.1}, DTYPES),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, DTYPES),
    ("sgd", {"learning_rate": 0.05, "momentum": 0.8, "rescale_grad": 0.5, "clip_gradient": 0.3}, DTYPES),
    ("sgd", {"momentum": 0.9, "lr_scheduler": SCHED}, DTYPES),
    ("sgd", {"learning_rate": 0.1, "lr_mult": {"0": 2.5}, "wd": 0.1, "wd_mult": {"0": 0.5}}, DTYPES),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "param_idx2name": {"0": "fc_bias"}, "wd": 0.5,
             "lr_mult": {"fc_bias": 0.5}}, ["float32"]),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "multi_precision": True}, ["float16"]),
    ("sgd", {"learning_rate": 0.1, "lr_scheduler": WARM}, ["float32"]),
    ("sgd", {"lr_scheduler": COS}, ["float32"]),
    ("sgd", {"lr_scheduler": MULTI, "begin_num_update": 1}, ["float32"]),
    ("test", {"rescale_grad": 0.5}, DTYPES),
    ("nag", {"learning_rate": 0.1}, DTYPES),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, DTYPES),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9, "clip_gradient": 0.2, "rescale_grad": 2.0}, DTYPES),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9, "multi_precision": True}, ["float16"]),
    ("adam", {}, DTYPES),
    ("adam", {"learning_rate": 0.01, "wd": 0.1, "clip_gradient": 0.5, "rescale_grad": 2.0}, DTYPES),
    ("adam", {"learning_rate": 0.01, "lr_scheduler": SCHED}, ["float32"]),
    ("adam", {"learning_rate": 0.01, "multi_precision": True}, ["float16"]),
    ("adamw", {"learning_rate": 0.01, "wd": 0.1}, DTYPES),
    ("adamw", {"learning_rate": 0.01, "wd": 0.1, "clip_gradient": 0.5, "rescale_grad": 2.0}, DTYPES),
    ("adamw", {"learning_rate": 0.01, "wd": 0.1, "multi_precision": True}, ["float16"]),
    ("adagrad", {"learning_rate": 0.1}, DTYPES),
    ("adagrad", {"learning_rate": 0.1, "wd": 0.1, "clip_gradient": 0.5, "rescale_grad": 2.0}, DTYPES),
    ("adagrad", {"learning_rate": 0.1, "multi_precision": True}, ["float16"]),
    ("adadelta", {}, DTYPES),
    ("adadelta", {"rho": 0.8, "wd": 0.1, "clip_gradient": 0.5, "rescale_grad": 2.0}, DTYPES),
    ("rmsprop", {"learning_rate": 0.01}, DTYPES),
    ("rmsprop", {"learning_rate": 0.01, "wd": 0.1, "clip_gradient": 0.5, "clip_weights": 0.4}, DTYPES),
    ("rmsprop", {"learning_rate": 0.01, "centered": True}, DTYPES),
    ("rmsprop", {"learning_rate": 0.01, "centered": True, "gamma2": 0.8, "wd": 0.1, "rescale_grad": 2.0}, DTYPES),
    ("rmsprop", {"learning_rate": 0.01, "centered": True, "multi_precision": True}, ["float16"]),
    ("signum", {}, DTYPES),
    ("signum", {"learning_rate": 0.05, "momentum": 0.0, "wd": 0.1}, DTYPES),
    ("signum", {"learning_rate": 0.05, "wd": 0.1, "wd_lh": 0.01, "clip_gradient": 0.3}, DTYPES),
    ("ftrl", {}, DTYPES),
    ("ftrl", {"learning_rate": 0.5, "lamda1": 0.001, "beta": 0.5, "wd": 0.1, "clip_gradient": 0.5}, DTYPES),
    ("lamb", {"learning_rate": 0.01}, DTYPES),
    ("lamb", {"learning_rate": 0.01, "wd": 0.1, "clip_gradient": 0.5, "lower_bound": 2.0, "upper_bound": 3.0}, DTYPES),
    ("lamb", {"learning_rate": 0.01, "bias_correction": False, "multi_precision": True}, ["float16"]),
    ("lars", {"learning_rate": 0.1, "eta": 0.5}, DTYPES),
    ("lars", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "eta": 0.5, "lr_scheduler": SCHED}, DTYPES),
    ("lars", {"learning_rate": 0.1, "momentum": 0.9, "eta": 0.5, "param_idx2name": {"0": "bn_gamma"}}, ["float32"]),
    ("adamax", {}, DTYPES),
    ("adamax", {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "wd": 0.1, "clip_gradient": 0.5,
                "rescale_grad": 2.0}, DTYPES),
    ("adamax", {"lr_scheduler": SCHED}, ["float32"]),
    ("adamax", {"learning_rate": 0.01, "multi_precision": True}, ["float16"]),
    ("nadam", {}, DTYPES),
    ("nadam", {"learning_rate": 0.01, "schedule_decay": 0.1, "wd": 0.1, "clip_gradient": 0.5,
               "rescale_grad": 2.0}, DTYPES),
    ("nadam", {"learning_rate": 0.01, "beta1": 0.8, "lr_scheduler": SCHED}, ["float32"]),
    ("nadam", {"learning_rate": 0.01, "multi_precision": True}, ["float16"]),
    ("nadam", {"learning_rate": 0.01}, ["float32", "float64"], {"keys": 3}),
    ("ftml", {}, DTYPES),
    ("ftml", {"learning_rate": 0.05, "beta1": 0.5, "wd": 0.1, "clip_gradient": 0.5, "rescale_grad": 2.0},
     DTYPES),
    ("ftml", {"lr_scheduler": SCHED}, ["float32"]),
    ("ftml", {"learning_rate": 0.05, "multi_precision": True}, ["float16"]),
    ("ftml", {"learning_rate": 0.05}, ["float32"], {"keys": 2}),
    ("dcasgd", {"learning_rate": 0.1}, DTYPES),
    ("dcasgd", {"learning_rate": 0.1, "lamda": 0.5, "wd": 0.1, "clip_gradient": 0.3, "rescale_grad": 2.0},
     DTYPES),
    ("dcasgd", {"lamda": 0.2, "lr_scheduler": SCHED}, ["float32"]),
    ("dcasgd", {"learning_rate": 0.1, "lamda": 0.5, "multi_precision": True}, ["float16"]),
    ("dcasgd", {"learning_rate": 0.1, "momentum": 0.9}, DTYPES),
    ("ccsgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, DTYPES),
    ("ccsgd", {"learning_rate": 0.05, "rescale_grad": 0.5, "clip_gradient": 0.3}, DTYPES),
    ("ccsgd", {"momentum": 0.9, "lr_scheduler": SCHED, "multi_precision": True}, ["float16"]),
    ("groupadagrad", {"learning_rate": 0.1}, DTYPES),
    ("groupadagrad", {"learning_rate": 0.1, "eps": 1e-3, "clip_gradient": 0.3, "rescale_grad": 2.0},
     ["float32"]),
    ("groupadagrad", {"lr_scheduler": SCHED}, ["float32"]),
    ("groupadagrad", {"learning_rate": 0.1, "multi_precision": True}, ["float16"]),
    ("groupadagrad", {"learning_rate": 0.1, "wd": 0.1}, ["float32"]),
]

# Row-sparse gradients: state carried over rows that come and go, an empty gradient, a step
# with every row. Lazy (sparse) updates, standard ones with lazy_update=False, and optimizers
# MXNet runs densely (storage fallback, or NDArray operations).
ROWS = [[1, 3], [0, 1, 4], [], [3], [0, 1, 2, 3, 4]]
ROWS_EMPTY_FIRST = [[], [2], [0, 2, 3], [], [1, 2, 4]]
SPARSE = {"grad_rows": ROWS, "shape": [5, 3]}
SPARSE_EMPTY_FIRST = {"grad_rows": ROWS_EMPTY_FIRST, "shape": [5, 3]}
# 48, 32, 0, 80 and 8 stored values (LARS takes the norm of the stored gradient values).
SPARSE_WIDE = {"grad_rows": [[0, 2, 3, 5, 7, 9], [1, 2, 3, 4], [], list(range(10)), [6]],
               "shape": [10, 8]}
CASES += [
    ("sgd", {"learning_rate": 0.1, "wd": 0.1}, DTYPES, SPARSE),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.1}, DTYPES, SPARSE),
    ("sgd", {"learning_rate": 0.05, "momentum": 0.8, "wd": 0.01, "rescale_grad": 0.5, "clip_gradient": 0.3},
     DTYPES, SPARSE),
    ("sgd", {"learning_rate": 0.1, "wd": 0.1, "clip_gradient": 0.2, "rescale_grad": 2.0}, ["float32"], SPARSE),
    ("sgd", {"learning_rate": 0.1, "wd": 0.1, "lazy_update": False}, DTYPES, SPARSE),
    ("sgd", {"learning_rate": 0.1, "wd": 0.1, "lazy_update": False, "clip_gradient": 0.2}, ["float32"],
     SPARSE_EMPTY_FIRST),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.1, "lazy_update": False}, DTYPES, SPARSE),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "multi_precision": True}, ["float16"], SPARSE),
    ("sgd", {"learning_rate": 0.1, "wd": 0.1, "multi_precision": True}, ["float16"], SPARSE),
    ("sgd", {"momentum": 0.9, "wd": 0.1, "lr_scheduler": SCHED}, ["float32"], SPARSE_EMPTY_FIRST),
    ("ccsgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, ["float32"], SPARSE),
    ("nag", {"learning_rate": 0.1, "wd": 0.1}, DTYPES, SPARSE),
    ("nag", {"learning_rate": 0.1, "wd": 0.1, "clip_gradient": 0.2, "rescale_grad": 2.0}, ["float32"], SPARSE),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, DTYPES, SPARSE),
    ("nag", {"learning_rate": 0.1, "wd": 0.1, "multi_precision": True}, ["float16"], SPARSE),
    ("adam", {"learning_rate": 0.01, "wd": 0.1}, DTYPES, SPARSE),
    ("adam", {"learning_rate": 0.01, "wd": 0.1, "clip_gradient": 0.3, "rescale_grad": 2.0}, DTYPES, SPARSE),
    ("adam", {"learning_rate": 0.01, "wd": 0.1}, ["float32"], SPARSE_EMPTY_FIRST),
    ("adam", {"learning_rate": 0.01, "wd": 0.1, "lazy_update": False}, DTYPES, SPARSE),
    ("adam", {"learning_rate": 0.01, "wd": 0.1, "clip_gradient": 0.3, "rescale_grad": 2.0, "lazy_update": False},
     DTYPES, SPARSE),
    ("adam", {"learning_rate": 0.01, "multi_precision": True}, ["float16"], SPARSE),
    ("adam", {"learning_rate": 0.01, "wd": 0.1, "lazy_update": False, "multi_precision": True}, ["float16"],
     SPARSE),
    ("adagrad", {"learning_rate": 0.1}, DTYPES, SPARSE),
    ("adagrad", {"learning_rate": 0.1, "clip_gradient": 0.5, "rescale_grad": 2.0}, ["float32"], SPARSE),
    ("adagrad", {"learning_rate": 0.1, "multi_precision": True}, ["float16"], SPARSE),
    ("adagrad", {"learning_rate": 0.1, "wd": 0.1}, ["float32"], SPARSE),
    ("groupadagrad", {"learning_rate": 0.1}, DTYPES, SPARSE),
    ("groupadagrad", {"learning_rate": 0.1, "eps": 1e-3, "clip_gradient": 0.3, "rescale_grad": 2.0},
     ["float32"], SPARSE),
    ("groupadagrad", {"learning_rate": 0.1, "multi_precision": True}, ["float16"], SPARSE),
    ("lars", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "eta": 0.5}, DTYPES, SPARSE),
    ("lars", {"learning_rate": 0.1, "wd": 0.01, "eta": 0.5, "rescale_grad": 2.0, "clip_gradient": 0.3},
     DTYPES, SPARSE),
    ("lars", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "eta": 0.5, "lazy_update": False},
     ["float32", "float64"], SPARSE),
    ("lars", {"learning_rate": 0.1, "wd": 0.01, "eta": 0.5, "lazy_update": False}, ["float32"], SPARSE),
    ("lars", {"momentum": 0.9, "eta": 0.5, "lr_scheduler": SCHED, "param_idx2name": {"0": "fc_weight"},
              "wd": 0.01}, ["float32"], SPARSE),
    ("lars", {"learning_rate": 0.1, "momentum": 0.9, "eta": 0.5, "param_idx2name": {"0": "fc_bias"}},
     ["float32"], SPARSE),
    ("lars", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "eta": 0.5, "multi_precision": True},
     ["float16"], SPARSE),
    ("lars", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01, "eta": 0.5, "rescale_grad": 0.5},
     ["float32", "float64"], SPARSE_WIDE),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, ["float32"], SPARSE_WIDE),
    ("rmsprop", {"learning_rate": 0.01, "wd": 0.1}, ["float32"], SPARSE),
    ("ftrl", {"wd": 0.1}, ["float32"], SPARSE),
    ("signum", {"learning_rate": 0.05, "wd": 0.1}, DTYPES, SPARSE),
    ("lamb", {"learning_rate": 0.01, "wd": 0.1}, ["float32"], SPARSE),
    ("adamax", {"wd": 0.1}, ["float32", "float16"], SPARSE),
    ("nadam", {"wd": 0.1}, ["float32"], SPARSE),
    ("ftml", {"wd": 0.1}, ["float32"], SPARSE),
    ("dcasgd", {"learning_rate": 0.1, "wd": 0.1}, ["float32"], SPARSE),
    ("adadelta", {"wd": 0.1}, ["float32"], SPARSE),
    ("test", {"rescale_grad": 0.5}, ["float32"], SPARSE),
    # SignSGD takes the sign of the raw gradient: rescaling (even negative) and clipping
    # change nothing.
    ("signum", {"learning_rate": 0.05, "momentum": 0.0, "wd": 0.1, "rescale_grad": -0.5,
                "clip_gradient": 0.01}, DTYPES),
    # A negative momentum keeps the state and steps with momentum 0 (Signum, not SignSGD).
    ("signum", {"learning_rate": 0.05, "momentum": -0.5, "wd": 0.1, "rescale_grad": 0.3}, DTYPES),
    # GroupAdaGrad refuses weight decay per key: a bias (wd_mult 0 by its name) takes a global wd.
    ("groupadagrad", {"learning_rate": 0.1, "wd": 0.1, "param_idx2name": {"0": "fc_bias"}},
     ["float32"]),
    # NAG with a negative momentum: the momentum kernel with momentum 0, not plain sgd.
    ("nag", {"learning_rate": 0.1, "momentum": -0.5, "wd": 0.1}, DTYPES),
    # Unclipped Signum: (1 - momentum) * rescale_grad * g, left to right.
    ("signum", {"learning_rate": 0.05, "momentum": 0.7, "wd": 0.2, "rescale_grad": 0.3}, DTYPES),
]


# Keys updated unevenly: key 0 at most steps, key 1 twice, key 2 three times (not at the first
# step), so that the largest count (the scheduler's) runs ahead of most keys' own.
UNEVEN = {"keys": 3, "updates": [[0, 1], [0], [0, 2], [2, 1, 0], [0], [2], [0, 2]]}
CASES += [
    ("sgd", {"momentum": 0.9, "lr_scheduler": SCHED}, ["float32"], UNEVEN),
    ("adam", {"learning_rate": 0.01, "lr_scheduler": SCHED}, ["float32", "float64"], UNEVEN),
    ("adam", {"learning_rate": 0.01, "lr_scheduler": SCHED, "multi_precision": True}, ["float16"],
     UNEVEN),
    ("nadam", {"learning_rate": 0.01}, ["float32"], UNEVEN),
    ("ftml", {"learning_rate": 0.05, "lr_scheduler": SCHED}, ["float32"], UNEVEN),
    ("lamb", {"learning_rate": 0.01, "lr_scheduler": SCHED}, ["float32"], UNEVEN),
    ("adamax", {"learning_rate": 0.01, "lr_scheduler": SCHED}, ["float32"], UNEVEN),
    ("sgd", {"learning_rate": 0.1, "lr_scheduler": WARM}, ["float32"], UNEVEN),
    # begin_num_update: every key's count starts there (bias corrections and schedulers).
    ("adam", {"learning_rate": 0.01, "begin_num_update": 3}, ["float32"]),
    ("adam", {"learning_rate": 0.01, "begin_num_update": 2, "lr_scheduler": SCHED}, ["float32"],
     UNEVEN),
    ("nadam", {"learning_rate": 0.01, "begin_num_update": 4}, ["float32"]),
    ("ftml", {"learning_rate": 0.05, "begin_num_update": 2}, ["float32"]),
    ("lamb", {"learning_rate": 0.01, "begin_num_update": 3}, ["float32"]),
    ("adamax", {"learning_rate": 0.01, "begin_num_update": 5}, ["float32"]),
    ("sgd", {"momentum": 0.9, "begin_num_update": 3, "lr_scheduler": SCHED}, ["float32"]),
    # Longer float16 runs: rounding carried in the states over 40 steps.
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}, ["float16"], {"steps": 40}),
    ("adam", {"learning_rate": 0.01}, ["float16"], {"steps": 40}),
    ("adam", {"learning_rate": 0.01, "multi_precision": True}, ["float16"], {"steps": 40}),
    ("nag", {"learning_rate": 0.1, "momentum": 0.9}, ["float16"], {"steps": 40}),
    ("rmsprop", {"learning_rate": 0.01, "centered": True, "multi_precision": True}, ["float16"],
     {"steps": 40}),
]


def make_scheduler(spec):
    spec = dict(spec)
    kind = spec.pop("type")
    cls = {"factor": mx.lr_scheduler.FactorScheduler,
           "multifactor": mx.lr_scheduler.MultiFactorScheduler,
           "poly": mx.lr_scheduler.PolyScheduler,
           "cosine": mx.lr_scheduler.CosineScheduler}[kind]
    return cls(**spec)


def to_mx_params(params):
    out = {}
    for k, v in params.items():
        if k == "lr_scheduler":
            out[k] = make_scheduler(v)
        elif k in ("lr_mult", "wd_mult"):
            continue
        elif k == "param_idx2name":
            out[k] = {int(i): n for i, n in v.items()}
        else:
            out[k] = v
    return out


def mults(params, name):
    return {(int(k) if k.isdigit() else k): v for k, v in params.get(name, {}).items()}


def gradient(g, dtype, rows):
    """A fresh copy of `g`: dense, or row-sparse with exactly `rows` when rows is not None."""
    if rows is None:
        return mx.nd.array(g, dtype=dtype)
    idx = np.array(rows, dtype=np.int64)
    return mx.nd.sparse.row_sparse_array((g[idx], idx), shape=g.shape, dtype=dtype)


def run_updater(name, params, w0, grads, dtype, keys=1, grad_rows=None, updates=None):
    opt = mx.optimizer.create(name, **to_mx_params(params))
    opt.set_lr_mult(mults(params, "lr_mult"))
    opt.set_wd_mult(mults(params, "wd_mult"))
    updater = mx.optimizer.get_updater(opt)
    ws = [mx.nd.array(w0, dtype=dtype) for _ in range(keys)]
    out = []
    for step, g in enumerate(grads):
        rows = None if grad_rows is None else grad_rows[step]
        for k in (range(keys) if updates is None else updates[step]):
            updater(k, gradient(g, dtype, rows), ws[k])
        out.append([x for w in ws for x in w.asnumpy().astype(np.float64).ravel().tolist()])
    return out


def run_adamw(params, w0, grads, dtype):
    lr = params.get("learning_rate", 0.001)
    wd = params.get("wd", 0.0)
    b1, b2, eps = 0.9, 0.999, 1e-8
    mp = params.get("multi_precision", False) and dtype == "float16"
    kwargs = {"beta1": b1, "beta2": b2, "epsilon": eps, "wd": wd}
    if params.get("clip_gradient"):
        kwargs["clip_gradient"] = params["clip_gradient"]
    w = mx.nd.array(w0, dtype=dtype)
    sdtype = "float32" if mp else dtype
    mean = mx.nd.zeros(w0.shape, dtype=sdtype)
    var = mx.nd.zeros(w0.shape, dtype=sdtype)
    w32 = w.astype("float32")
    rescale = mx.nd.array([params.get("rescale_grad", 1.0)], dtype="float32")
    out = []
    for t, g in enumerate(grads, start=1):
        corr = math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        grad = mx.nd.array(g, dtype=dtype)
        if mp:
            mx.nd.contrib.mp_adamw_update(w, grad, mean, var, w32, rescale, out=w,
                                          lr=corr, eta=lr, **kwargs)
        else:
            mx.nd.contrib.adamw_update(w, grad, mean, var, rescale, out=w,
                                       lr=corr, eta=lr, **kwargs)
        out.append(w.asnumpy().astype(np.float64).ravel().tolist())
    return out


def main():
    cases = []
    for i, (name, params, dtypes, *options) in enumerate(CASES):
        option = options[0] if options else {}
        keys = option.get("keys", 1)
        grad_rows = option.get("grad_rows")
        updates = option.get("updates")
        shape = tuple(option.get("shape", SHAPE))
        steps = option.get("steps", STEPS)
        if grad_rows is not None:
            steps = len(grad_rows)
        if updates is not None:
            steps = len(updates)
        for dtype in dtypes:
            rs = np.random.RandomState(1000 + i)
            w0 = rs.uniform(-1.0, 1.0, shape).astype(dtype)
            grads = [rs.normal(0.0, 0.5, shape).astype(dtype) for _ in range(steps)]
            if grad_rows is not None:
                for g, rows in zip(grads, grad_rows):
                    g[[r for r in range(shape[0]) if r not in rows]] = 0
            case = {
                "optimizer": name,
                "params": params,
                "dtype": dtype,
                "shape": list(shape),
                "weight": w0.astype(np.float64).ravel().tolist(),
                "grads": [g.astype(np.float64).ravel().tolist() for g in grads],
            }
            if keys > 1:
                case["keys"] = keys
            if grad_rows is not None:
                case["grad_rows"] = grad_rows
            if updates is not None:
                case["updates"] = updates
            try:
                if name == "adamw":
                    case["steps"] = run_adamw(params, w0, grads, dtype)
                else:
                    case["steps"] = run_updater(name, params, w0, grads, dtype, keys, grad_rows,
                                                updates)
            except Exception as e:  # pylint: disable=broad-except
                lines = [l.strip() for l in str(e).splitlines() if "Check failed" in l]
                case["mxnet_error"] = (lines or [type(e).__name__])[0][:200]
            cases.append(case)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimizers.json")
    with open(path, "w") as f:
        json.dump({"mxnet_version": mx.__version__, "cases": cases}, f, indent=None,
                  separators=(",", ":"), allow_nan=False)
        f.write("\n")


if __name__ == "__main__":
    main()
