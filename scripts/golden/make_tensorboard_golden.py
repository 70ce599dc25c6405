"""TensorBoard's own reading of kiln's event file (tests/report.rs checks it against metrics.jsonl).

tests/fixtures/tensorboard/events.out.tfevents.1000000000.kiln is what kiln writes for the
committed metrics.jsonl beside it (tests/report.rs rewrites it with KILN_BLESS=1 and otherwise
checks its bytes). This script reads it with tensorboard's EventAccumulator and writes every
scalar and text it found to accumulated.json.

    $KILN_REFPY -m pip install tensorboard==2.21.0
    $KILN_REFPY scripts/golden/make_tensorboard_golden.py
"""
import json
import os

import tensorboard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FIX = os.path.join(os.path.dirname(__file__), "../../tests/fixtures/tensorboard")

acc = EventAccumulator(FIX, size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
out = {
    "reader": f"tensorboard {tensorboard.__version__} EventAccumulator",
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in sorted(tags["scalars"])},
    # The text plugin's tensors: one string each.
    "texts": {
        t: [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(t)]
        for t in sorted(tags["tensors"])
    },
}
with open(os.path.join(FIX, "accumulated.json"), "w") as f:
    json.dump(out, f, indent=1)
print({k: len(v) for k, v in out["scalars"].items()}, list(out["texts"]))
