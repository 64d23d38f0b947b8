"""What ``--quant auto`` and ``--head-quant auto`` choose on this machine, for each of petald's CPU
kernel sets, with SmolLM2 (kernels/quant_choice.py).

    python benchmarks/quant_choice.py [--threads 1] [--kernels auto avx2]

Each kernel set runs in its own process (``PETALD_CPU_KERNELS`` is read once per process), with
a fresh cache directory, so that every agreement is measured, not read back. Prints each
process's one-line choice (every mode's time against "none" and its top-1 agreement with float32
on the reference text) and the CPU features it ran with.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

MEASURE = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from petald.kernels.native.native_library import PROCESS_LIBRARY
from petald.kernels.quant_choice import choose_block_quant, choose_head_quant
from petald.kernels.sources.open_source import open_source
source = open_source(None)
cpu = torch.device("cpu")
print("cpu features:", ", ".join(sorted(PROCESS_LIBRARY.cpu_features())))
print(choose_block_quant(source, torch.float32, cpu).describe("--quant"))
print(choose_head_quant(source, cpu).describe("--head-quant"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", nargs="+", default=["auto", "avx2"], help="PETALD_CPU_KERNELS values")
    args = parser.parse_args()
    for kernels in args.kernels:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, PETALD_CPU_KERNELS=kernels, PETALD_CACHE_DIR=cache, HF_HUB_OFFLINE="1",
                       TRANSFORMERS_VERBOSITY="error")
            result = subprocess.run([sys.executable, "-c", MEASURE, str(args.threads)], env=env, text=True,
                                    capture_output=True)
        print(f"## PETALD_CPU_KERNELS={kernels}")
        print(result.stdout.strip() or result.stderr.strip())


if __name__ == "__main__":
    main()
