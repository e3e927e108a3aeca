// RLR: a live reward chart drawn on the RLR Trainer node, fed by the server's "rlr.train.step" events.
// Axes: update (x, 0 .. total) and batch reward (y), with tick values. Namespaced ("rlr.rewardChart"),
// chains the node's existing onDrawForeground, keeps no state on the server.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const HEIGHT = 120;
const MAX_POINTS = 2000;
const PAD = { left: 42, right: 10, top: 16, bottom: 26 };

// "nice" tick values between lo and hi (about n of them)
export function niceTicks(lo, hi, n = 4) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (hi === lo) return [lo];
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function label(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.01 || a >= 1e4)) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

export function drawChart(node, ctx) {
  const pts = node.rlrRewards;
  if (!pts || pts.length === 0) return;
  const left = 10 + PAD.left, right = node.size[0] - 10 - PAD.right;
  const top = node.size[1] - HEIGHT - 6 + PAD.top, bottom = node.size[1] - 6 - PAD.bottom;
  const w = right - left, h = bottom - top;
  if (w < 20 || h < 20) return;
  const vals = pts.map((p) => p.reward).filter((v) => v !== null && Number.isFinite(v));
  const total = pts[pts.length - 1].total || pts[pts.length - 1].step || 1;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(10, node.size[1] - HEIGHT - 6, node.size[0] - 20, HEIGHT);
  ctx.font = "10px sans-serif";
  ctx.strokeStyle = "#888";
  ctx.fillStyle = "#ccc";
  ctx.lineWidth = 1;
  // axes
  ctx.beginPath();
  ctx.moveTo(left, top);
  ctx.lineTo(left, bottom);
  ctx.lineTo(right, bottom);
  ctx.stroke();
  // x ticks: updates
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of niceTicks(0, total, 4)) {
    const x = left + (w * t) / total;
    ctx.beginPath();
    ctx.moveTo(x, bottom);
    ctx.lineTo(x, bottom + 3);
    ctx.stroke();
    ctx.fillText(label(t), x, bottom + 4);
  }
  ctx.fillText("update", left + w / 2, bottom + 14);
  if (vals.length > 0) {
    let lo = Math.min(...vals), hi = Math.max(...vals);
    if (hi === lo) { lo -= 0.5 * (Math.abs(lo) || 1) * 0.1; hi += 0.5 * (Math.abs(hi) || 1) * 0.1; }
    const span = hi - lo;
    const y = (v) => bottom - (h * (v - lo)) / span;
    // y ticks: reward
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of niceTicks(lo, hi, 3)) {
      ctx.beginPath();
      ctx.moveTo(left - 3, y(t));
      ctx.lineTo(left, y(t));
      ctx.stroke();
      ctx.fillText(label(t), left - 5, y(t));
    }
    ctx.save();
    ctx.translate(14, top + h / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText("reward", 0, 0);
    ctx.restore();
    // the curve
    ctx.strokeStyle = "#4fa3ff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let first = true;
    for (const p of pts) {
      if (p.reward === null || !Number.isFinite(p.reward)) continue;
      const x = left + (w * p.step) / total;
      if (first) { ctx.moveTo(x, y(p.reward)); first = false; } else { ctx.lineTo(x, y(p.reward)); }
    }
    ctx.stroke();
    const last = pts[pts.length - 1];
    ctx.fillStyle = "#ddd";
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(`batch reward ${label(vals[vals.length - 1])} at update ${last.step} of ${last.total}`, left + 4,
                 top - 4);
  }
  ctx.restore();
}

app.registerExtension({
  name: "rlr.rewardChart",
  async setup() {
    api.addEventListener("rlr.train.step", (event) => {
      const d = event.detail || {};
      const node = app.graph && app.graph.getNodeById(Number(d.node));
      if (!node) return;
      if (!node.rlrRewards || d.step === 1) node.rlrRewards = [];
      node.rlrRewards.push({ step: d.step, total: d.total, reward: d.reward });
      if (node.rlrRewards.length > MAX_POINTS) node.rlrRewards.shift();
      node.setDirtyCanvas(true, false);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "RLR_Trainer") return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) drawChart(this, ctx);
      return r;
    };
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize ? computeSize.apply(this, arguments) : [300, 100];
      return [size[0], size[1] + HEIGHT + 10];
    };
  },
});
