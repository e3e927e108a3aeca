"""Memory model of a training update: peak memory from model, resolution, batch, T, h and the trainer's
memory options, fitted to CPU measurements of the real SD1.5 / SDXL architectures.

    python -m benchmarks.memory_model                # measure what is missing (--budget-minutes 120), fit, write the page
    python -m benchmarks.memory_model --quick        # CI-time budget: small points only (a few minutes), no page
    python -m benchmarks.memory_model --report-only  # re-fit and re-render from the saved measurements

Why a model and not a measurement: the targets (SD1.5 at 512 px, SDXL at 1024 px, fp16 on a GPU) do
not run on a 2-core CPU machine, but their *bytes* do not depend on the device. So we

1. build the real architectures (``benchmarks.sd_archs``: SD1.5 and SDXL UNets, the SD VAE, a CLIP
   ViT-L/14 reward tower) at random init from their public configs (nothing downloads) in bfloat16 (the
   same bytes as fp16; fp16 kernels are missing or slow on CPU), with a rank-4 LoRA on the attention
   projections in fp32 and CPU autocast, as the trainer runs them;
2. measure (``measure``), per component and size, the tensor bytes a forward keeps for backward
   (``retained``) and the peak of forward + backward (``peak``), from the profiler's allocation events
   (the CPU analogue of ``torch.cuda.max_memory_allocated`` minus what was live before);
3. fit (``fit``) each as ``c + n * (b + a * P + q * P^2)`` (n = batch of the call, P = latent pixels;
   the quadratic term is self-attention scores, if a kernel materialises them) with non-negative
   coefficients and relative-error weighting;
4. compose (``model``) an update's peak as weights + optimizer state + stored chain + the largest phase
   (sampling, first-order window, half-order window, zeroth-order step, or the trainer's evaluation
   between updates), where a backpropagated window of segments s_1..s_m peaks at
   ``max_i (sum_{j<i} retained_j + peak_i)``; the trainer's options come from a ``TrainConfig``
   (``Options.from_config``);
5. validate the composition against whole ``rlr_estimate`` / ``full_bp`` / ``ddpo`` updates on small
   SD-shaped stacks (``validation``), and read back the full-size check of real SD1.5 ``rlr-train``
   updates (``full_size``; measured by ``python -m benchmarks.memory_validation``);
6. render docs/memory.md (``analysis``, ``plots``, ``report``; the GPU check's section comes from
   ``benchmarks.gpu_check``).

Measurements are saved point by point to benchmarks/results/memory-model.json, so a run resumes and
``--report-only`` regenerates docs/memory.md without measuring.
"""

from ..sd_archs import (AESTHETIC_HEAD_PARAMS, ARCHS, CLIP_L_TEXT, CLIP_VIT_L14_VISION, LORA_TARGETS,
                        MEASURE_DTYPE, OPENCLIP_BIGG_TEXT, SD15_UNET, SD_VAE, SDXL_UNET, AestheticReward,
                        build_reward, build_unet, build_vae, lora_param_count, param_count, reward_params,
                        text_encoder_params)
from .analysis import analyse
from .cli import machine, main, summary
from .fit import FIT_TERMS, Fit, Fits, fit_bytes, fit_components
from .measure import (MARK, Measurer, Point, SegmentMemory, available_bytes, guess_need, live_bytes_trace,
                      measure_nograd, measure_segment, plan, run_measurements, weight_bytes)
from .model import (CARDS, MARGIN_FIXED, MARGIN_FRACTION, OPTION_SETS, PHASE_ESTIMATORS, Options, PartScale, Scenario,
                    UpdatePhases, chain_peak, chain_store_bytes, checkpointed, ddpo_phases, evaluation_bytes,
                    full_bp_phases, gpu_config, model_counts, persistent_bytes, predict, rlr_phases, sequential,
                    smallest_card, truncated_bp_phases, update_phases, with_margin)
from .plots import plot
from .report import render
from .store import DOC, GB, QUICK_RESULTS, RESULTS, load
from .validation import ValidationCase, stack_components, validate, validate_problem, validation_cases

__all__ = [
    "AESTHETIC_HEAD_PARAMS", "ARCHS", "CARDS", "CLIP_L_TEXT", "CLIP_VIT_L14_VISION", "DOC", "FIT_TERMS", "GB",
    "LORA_TARGETS", "MARGIN_FIXED", "MARGIN_FRACTION", "MARK", "MEASURE_DTYPE", "OPENCLIP_BIGG_TEXT",
    "OPTION_SETS", "PHASE_ESTIMATORS", "PartScale", "QUICK_RESULTS", "RESULTS", "SD15_UNET", "SDXL_UNET", "SD_VAE",
    "AestheticReward", "Fit", "Fits", "Measurer", "Options", "Point", "Scenario", "SegmentMemory",
    "UpdatePhases", "ValidationCase", "analyse", "available_bytes", "build_reward", "build_unet", "build_vae",
    "chain_peak", "chain_store_bytes", "checkpointed", "ddpo_phases", "evaluation_bytes", "fit_bytes",
    "fit_components", "full_bp_phases", "gpu_config", "guess_need", "live_bytes_trace", "load",
    "lora_param_count", "machine", "main", "measure_nograd", "measure_segment", "model_counts", "param_count",
    "persistent_bytes", "plan", "plot", "predict", "render", "reward_params", "rlr_phases", "run_measurements",
    "sequential", "smallest_card", "stack_components", "summary", "text_encoder_params", "truncated_bp_phases",
    "update_phases", "validate", "validate_problem", "validation_cases", "weight_bytes", "with_margin",
]
