#!/usr/bin/env python3
"""Writes the pickles MXNet 1.9.1's `kv.set_optimizer` sends the servers (protocol 0, as
`pickle.dumps(optimizer, 0)` in mxnet/kvstore.py), one per optimizer MXNet registers and per
learning-rate scheduler, for kvstore-pslite's tests (`tests/mxnet_pickles.rs`), which check
that kvstore-pslite's server reads each as data into an optimizer kvstore-optimizer builds.

Usage (a Python with mxnet==1.9.1 and numpy==1.23.5):

    python kvstore-pslite/scripts/mxnet_optimizer_pickles.py \
        kvstore-pslite/tests/data/mxnet_optimizer_pickles.txt

Each line: a label, a tab, the pickle in hex.
"""
import pickle
import sys

import mxnet as mx

assert mx.__version__ == "1.9.1", mx.__version__

schedulers = {
    "factor": mx.lr_scheduler.FactorScheduler(step=3, factor=0.5, base_lr=0.1),
    "multifactor": mx.lr_scheduler.MultiFactorScheduler(step=[2, 5], factor=0.1),
    "poly": mx.lr_scheduler.PolyScheduler(max_update=10, base_lr=0.1, pwr=2, warmup_steps=2),
    "cosine": mx.lr_scheduler.CosineScheduler(max_update=10, base_lr=0.1, final_lr=0.01),
}

lines = []
for name, cls in sorted(mx.optimizer.Optimizer.opt_registry.items()):
    # GroupAdaGrad takes no weight decay (MXNet fails its first update with one).
    wd = {} if name == "groupadagrad" else {"wd": 0.001}
    optimizer = cls(learning_rate=0.05, rescale_grad=0.5, **wd)
    lines.append(f"{name}\t{pickle.dumps(optimizer, 0).hex()}")

for kind, scheduler in schedulers.items():
    optimizer = mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, lr_scheduler=scheduler)
    lines.append(f"sgd+{kind}\t{pickle.dumps(optimizer, 0).hex()}")

with open(sys.argv[1], "w") as out:
    out.write("\n".join(lines) + "\n")
