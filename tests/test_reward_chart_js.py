"""The Trainer node's reward chart (web/rlr_reward_chart.js) drawn by node.js into a recording canvas:
labelled axes (update, reward) with tick values. Skipped where node.js is not installed."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

CHART = Path(__file__).resolve().parents[1] / "web" / "rlr_reward_chart.js"

SCRIPT = r"""
globalThis.app = { registerExtension() {} }; globalThis.api = {};
const src = (await import("node:fs")).readFileSync(process.argv[2], "utf8").replace(/^import .*$/gm, "");
const m = await import("data:text/javascript," + encodeURIComponent(src));
const texts = [];
const ctx = new Proxy({}, { get: (t, k) => k in t ? t[k] : (k === "fillText" ? (s) => texts.push(String(s)) : () => {}),
                            set: (t, k, v) => { t[k] = v; return true; } });
const node = { size: [340, 400], rlrRewards: [] };
for (let i = 1; i <= 12; i++) node.rlrRewards.push({ step: i, total: 60, reward: 1.40 + 0.005 * i });
m.drawChart(node, ctx);
console.log(JSON.stringify({ texts, ticks: m.niceTicks(0, 60, 4) }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js is not installed")
def test_chart_has_labelled_axes_and_tick_values(tmp_path):
    script = tmp_path / "run.mjs"
    script.write_text(SCRIPT)
    out = subprocess.run(["node", str(script), str(CHART)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    texts = result["texts"]
    assert "update" in texts and "reward" in texts
    assert {"0", "20", "40", "60"} <= set(texts)  # x ticks over the run's 60 updates
    y_ticks = [t for t in texts if t.startswith("1.4")]
    assert len(y_ticks) >= 2  # reward tick values between 1.405 and 1.46
    assert any(t.startswith("batch reward 1.46 at update 12 of 60") for t in texts)
    assert result["ticks"] == [0, 20, 40, 60]
