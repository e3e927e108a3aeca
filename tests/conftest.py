"""Suite-wide settings: one torch thread (2-core CI), no hub access, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

# benchmarks train in a folder kept between invocations (efficiency.work_dir); the tests' runs go elsewhere
os.environ["RLR_BENCH_WORK"] = tempfile.mkdtemp(prefix="rlr-bench-tests-")
atexit.register(shutil.rmtree, os.environ["RLR_BENCH_WORK"], True)

torch.set_num_threads(1)
