"""The markdown page of a GPU check run (benchmarks/results/gpu-check.md), rendered from its JSON record."""

from __future__ import annotations

GB = 1e9


def _gb(b) -> str:
    return "-" if b is None else f"{b / GB:.2f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _pct(r) -> str:
    return "-" if r is None else f"{r - 1:+.1%}"


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def header(data: dict) -> list[str]:
    env = data.get("environment", {})
    if env.get("gpu"):
        where = (f"{env['gpu']} ({env.get('gpu_memory_bytes', 0) / GB:.0f} GB, "
                 f"compute {env.get('compute_capability')}), "
                 f"driver {env.get('driver') or '?'}, CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}")
    else:
        where = f"no CUDA device: {env.get('cpu', '?')}, {env.get('cores', '?')} cores"
    c = data.get("counts", {})
    return ["# GPU check" + (" (tiny configs)" if data.get("tiny") else ""), "",
            f"*{data.get('started', '?')}; {where}; torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
            f"transformers {env.get('transformers')}, peft {env.get('peft')}, commit {env.get('commit') or '?'}. "
            f"Command: `{data.get('command', 'python -m benchmarks.gpu_check')}`; {data.get('seconds', 0):.0f} s of a "
            f"{data.get('budget_s', 0):.0f} s budget. Data: `{data.get('json', 'gpu-check.json')}`.*", "",
            f"**{c.get('pass', 0)} passed, {c.get('fail', 0)} failed, {c.get('skipped', 0)} skipped.** "
            f"Memory tolerance: {data.get('memory_tolerance', 0):.0%} off the prediction.", ""]


def updates_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    T = next((r["T"] for r in rows if "T" in r), 50)
    out = ["## One update: peak memory and time", "",
           f"T = {T}, h = 2, LoRA rank 4 (fp32) + Adam, the aesthetic reward (CLIP ViT-L/14 image tower) "
           "backpropagated through the VAE decoder, text encoders offloaded, random weights. Measured = live tensor "
           "bytes at the peak (`torch.cuda.max_memory_allocated`; allocator reserve and CUDA context not included). "
           "*docs* = docs/memory.md's model (`memory_model.predict` on the CPU fits); *composed* = the same "
           "composition fed with this device's own measurements of one UNet step and of decode + reward. Time ratio "
           "= update (estimator + Adam step) / a no-grad sample of the same batch with the reward; the cost model "
           "counts model calls (benchmarks/cost.py).", "",
           "| model | B | estimator | status | measured GB | docs GB | vs docs | composed GB | vs composed | "
           "binding phase | update s | sample s | time ratio | cost model | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "variant" not in r:  # a build record
            out.append(f"| {r.get('model', r['name'])} | {r.get('batch', '-')} | (build, parts, sample) | "
                       f"{r['status']} | - | - | - | - | - | - | - | {_s(r.get('sample_seconds'))} | - | - | "
                       f"{r.get('summary', r.get('reason', ''))} |")
            continue
        measured = r.get("measured_bytes")
        ref = r.get("predicted_bytes")
        note = "; ".join(x for x in (r.get("reason", "") if r["status"] != "pass" else "",
                                     f"superseded: {r['superseded']}" if r.get("superseded") else "") if x)
        out.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['status']} | {_gb(measured)} | {_gb(ref)} | "
                   f"{_pct(measured / ref) if measured and ref else '-'} | {_gb(r.get('composed_bytes'))} | "
                   f"{_pct(r.get('composed_ratio'))} | {(r.get('binding_phase') or r.get('composed_phase') or '-')} | "
                   f"{_s(r.get('seconds'))} | {_s(r.get('sample_seconds'))} | {_x(r.get('time_ratio'))} | "
                   f"{_x(r.get('predicted_time_ratio'))} | {note} |")
    return out + [""]


def other_table(rows: list[dict], title: str) -> list[str]:
    if not rows:
        return []
    out = [f"## {title}", "", "| check | status | figures |", "|---|---|---|"]
    for r in rows:
        text = r.get("summary", "")
        if r["status"] != "pass" and r.get("reason"):
            text = f"{text}; {r['reason']}" if text else r["reason"]
        out.append(f"| {r['name']} | {r['status']} | {text} |")
    return out + [""]


def render(data: dict) -> str:
    checks = data.get("checks", [])
    lines = header(data)
    lines += updates_table([r for r in checks if r.get("group") == "update"])
    lines += other_table([r for r in checks if r.get("group") == "training"],
                         "Training: the embedded default on the device and on the CPU")
    lines += other_table([r for r in checks if r.get("group") not in ("update", "training")], "Other checks")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ sections of the docs pages
def load_result(results_dir) -> dict | None:
    """The newest full (not tiny) GPU check record in ``results_dir``, or None."""
    import json
    from pathlib import Path

    path = Path(results_dir) / "gpu-check.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _about(data: dict) -> str:
    env = data.get("environment", {})
    return (f"*{data.get('started', '?')[:10]}, {env.get('gpu', '?')} (driver {env.get('driver') or '?'}, CUDA "
            f"{env.get('torch_cuda')}), torch {env.get('torch')}, diffusers {env.get('diffusers')}, commit "
            f"{env.get('commit') or '?'}; `{data.get('command')}`; all figures in "
            "[benchmarks/results/gpu-check.md](../benchmarks/results/gpu-check.md).*")


NOT_YET = ("Not measured on a GPU yet: every figure here is predicted from CPU measurements. "
           "`python -m benchmarks.gpu_check` (under 8 minutes on one datacenter GPU; see "
           "[gpu_check.md](gpu_check.md)) measures them and this section is rendered from its result.")


def memory_doc_section(results_dir) -> list[str]:
    """docs/memory.md: measured peaks on a GPU against this page's predictions, and every gap over 10%."""
    data = load_result(results_dir)
    lines = ["## Measured on a GPU", ""]
    if data is None:
        return lines + [NOT_YET, ""]
    rows = [r for r in data.get("checks", []) if r.get("group") == "update" and "variant" in r]
    lines += [_about(data), "",
              "| model | B | estimator | measured GB | predicted GB | measured / predicted | status |",
              "|---|---|---|---|---|---|---|"]
    gaps = []
    for r in rows:
        m, p = r.get("measured_bytes"), r.get("predicted_bytes")
        why = f": {r['reason']}" if r.get("reason") else ""
        why += f" (superseded: {r['superseded']})" if r.get("superseded") else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {_gb(m)} | {_gb(p)} | "
                     f"{_pct(m / p) if m and p else '-'} | {r['status']}{why} |")
        if m and p and abs(m / p - 1) > 0.10 and not r.get("superseded"):
            gaps.append(f"- {r['model']}, {r['variant']}: {m / p - 1:+.1%} (composed from this GPU's own parts: "
                        f"{_pct(r.get('composed_ratio'))}).")
    lines += ["", "Gaps over 10% (a gap in *composed* too means the composition is wrong; only in the prediction, a "
              "component's CPU figure does not carry over to this GPU):" if gaps else "No gap over 10%.", *gaps, ""]
    return lines


def benchmarks_doc_section(results_dir) -> list[str]:
    """docs/benchmarks.md: update time over a no-grad sample on a GPU, and the default run on GPU vs CPU."""
    data = load_result(results_dir)
    lines = ["## On a GPU", ""]
    if data is None:
        return lines + [NOT_YET.replace("figure here", "GPU figure"), ""]
    checks = data.get("checks", [])
    lines += [_about(data), "",
              "| model | B | estimator | update (s) | no-grad sample (s) | time / sample | cost model |",
              "|---|---|---|---|---|---|---|"]
    for r in checks:
        if r.get("group") == "update" and "variant" in r and r.get("seconds") is not None:
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {_s(r['seconds'])} | "
                         f"{_s(r['sample_seconds'])} | {_x(r.get('time_ratio'))} | "
                         f"{_x(r.get('predicted_time_ratio'))} |")
    for r in checks:
        if r.get("group") in ("training", "nodes"):
            lines += ["", f"- {r['name']}: **{r['status']}**. {r.get('summary', '')}"
                      + (f" ({r['reason']})" if r.get("reason") and r["status"] != "pass" else "")]
    return lines + [""]
