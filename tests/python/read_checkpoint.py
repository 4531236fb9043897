"""Reads a ballast checkpoint with Python's safetensors and compares it with what ballast wrote.

usage: read_checkpoint.py CHECKPOINT EXPECTED_JSON

EXPECTED_JSON maps tensor names to {"shape": [...], "values": [...]} (float32 values as
written by ballast). Exits non-zero with a message on any difference.
"""
import json
import sys

import numpy as np
from safetensors import safe_open


def main() -> int:
    path, expected_path = sys.argv[1], sys.argv[2]
    with open(expected_path) as f:
        expected = json.load(f)
    with safe_open(path, framework="numpy") as st:
        names = sorted(st.keys())
        meta = st.metadata()
        if sorted(expected) != names:
            print(f"names differ: python {names} vs ballast {sorted(expected)}")
            return 1
        if meta.get("format") != "ballast-checkpoint/1":
            print(f"metadata format is {meta.get('format')!r}")
            return 1
        state = json.loads(meta["state"])
        for name in names:
            t = st.get_tensor(name)
            want = expected[name]
            if t.dtype != np.float32 or list(t.shape) != want["shape"]:
                print(f"{name}: {t.dtype} {list(t.shape)} vs float32 {want['shape']}")
                return 1
            w = np.asarray(want["values"], dtype=np.float32).reshape(want["shape"])
            if not np.array_equal(t, w):
                print(f"{name}: values differ (max {np.max(np.abs(t - w))})")
                return 1
    print(f"python safetensors: {len(names)} tensors equal; step {state['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
