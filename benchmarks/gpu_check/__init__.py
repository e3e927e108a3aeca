"""GPU acceptance check: measure on a real GPU what the CPU can only predict, in one short run.

    python -m benchmarks.gpu_check                 # on a CUDA GPU: budget 8 min (~5 min estimated on an H200)
    python -m benchmarks.gpu_check --budget-s 300  # a shorter budget: the least valuable checks are skipped
    python -m benchmarks.gpu_check --tiny          # tiny configs, seconds on a CPU (the test suite runs it)

Checks, most valuable first (each is pass / fail / skipped; the exit code is 1 if any failed):

1. One training update per estimator (RLR default fo_steps=4 and paper fo_steps=1, with and without
   gradient checkpointing; DDPO; truncated and full backprop) on the SD1.5 architecture at 512 px in
   fp16 and SDXL at 1024 px in bf16 (random weights, published configs, built on the GPU; T = 50,
   h = 2): peak CUDA memory against docs/memory.md's prediction and update time against a no-grad
   sample (``updates.py``). An update predicted not to fit the card is skipped; an out-of-memory error
   is caught and recorded as a failed prediction.
2. ``rlr-train``'s defaults (the embedded model), 20 updates on the GPU and on the CPU from the same
   seed: the LoRAs agree and the reward curves move alike (``training.py``; the CPU run goes in a
   subprocess during step 1).
3. The ComfyUI Trainer node (embedded default, a few updates) on the GPU.

Without a CUDA device the script says so in one line, runs the tiny checks on the CPU and exits 0 when
they pass. Results: benchmarks/results/gpu-check.json and gpu-check.md (``--tiny``: gpu-check-tiny.*),
saved after every check. docs/gpu_check.md says how the figures go into docs/memory.md and
docs/benchmarks.md.
"""
