// RLR: a live reward chart drawn on the RLR Trainer node, fed by the server's "rlr.train.step" events.
// Namespaced ("rlr.rewardChart"), chains the node's existing onDrawForeground, keeps no state on the server.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const HEIGHT = 90;
const MAX_POINTS = 2000;

function drawChart(node, ctx) {
  const pts = node.rlrRewards;
  if (!pts || pts.length === 0) return;
  const w = node.size[0] - 20;
  const top = node.size[1] - HEIGHT - 6;
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.35)";
  ctx.fillRect(10, top, w, HEIGHT);
  const vals = pts.map((p) => p.reward).filter((v) => v !== null && Number.isFinite(v));
  if (vals.length > 0) {
    const lo = Math.min(...vals), hi = Math.max(...vals);
    const span = hi - lo || 1;
    const total = pts[pts.length - 1].total || pts.length;
    ctx.strokeStyle = "#4fa3ff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let first = true;
    for (const p of pts) {
      if (p.reward === null || !Number.isFinite(p.reward)) continue;
      const x = 10 + (w * p.step) / total;
      const y = top + HEIGHT - 4 - ((HEIGHT - 8) * (p.reward - lo)) / span;
      if (first) { ctx.moveTo(x, y); first = false; } else { ctx.lineTo(x, y); }
    }
    ctx.stroke();
    ctx.fillStyle = "#ddd";
    ctx.font = "10px sans-serif";
    const last = pts[pts.length - 1];
    ctx.fillText(`reward ${vals[vals.length - 1].toFixed(3)}  step ${last.step}/${last.total}`, 14, top + 12);
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
