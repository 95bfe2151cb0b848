// Small SVG charts for the dashboard (loratune's own; no library): line charts whose series
// grow point by point, and a horizontal bar chart.
"use strict";

const PALETTE = ["#2f6fb3", "#d9822b", "#2e9e5b", "#c23b4e", "#7b5ea7", "#8c6d31",
                 "#e377c2", "#17becf"];
const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

function fmt(v, step) {
  // enough decimals to tell ticks `step` apart
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(step ? Math.max(1, Math.ceil(Math.log10(a / step))) : 1);
  if (step) return v.toFixed(Math.max(0, -Math.floor(Math.log10(step))));
  return +v.toPrecision(4) + "";
}

class LineChart {
  // container: an element; opts: {title, xlabel, height, dots: names of series drawn as dots}
  constructor(container, opts) {
    this.opts = Object.assign({width: 460, height: 220, xlabel: "step"}, opts || {});
    this.series = new Map();        // name -> [[x, y], ...]
    this.el = document.createElement("figure");
    this.el.className = "chart";
    this.el.dataset.title = this.opts.title || "";
    container.appendChild(this.el);
    this.render();
  }
  add(name, x, y) {
    if (y === null || y === undefined || !isFinite(y)) return;
    if (!this.series.has(name)) this.series.set(name, []);
    this.series.get(name).push([x, y]);
  }
  clear() { this.series.clear(); this.render(); }
  points(name) { return (this.series.get(name) || []).length; }
  render() {
    const {width: W, height: H, title, xlabel} = this.opts;
    const m = {l: 52, r: 10, t: 22, b: 30};
    const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img"});
    svg.appendChild(svgEl("text", {x: m.l, y: 14, class: "chart-title"}, title || ""));
    const all = [...this.series.values()].flat();
    if (!all.length) {
      svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, class: "chart-empty",
                                     "text-anchor": "middle"}, "no points yet"));
    } else {
      const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
      let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      if (x1 === x0) x1 = x0 + 1;
      if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
      const sx = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
      const sy = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
      const yt = niceTicks(y0, y1, 4), xt = niceTicks(x0, x1, 5);
      for (const t of yt) {
        svg.appendChild(svgEl("line", {x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t), class: "grid"}));
        svg.appendChild(svgEl("text", {x: m.l - 4, y: sy(t) + 3, "text-anchor": "end",
                                       class: "tick"}, fmt(t, yt[1] - yt[0])));
      }
      for (const t of xt) {
        svg.appendChild(svgEl("text", {x: sx(t), y: H - m.b + 13, "text-anchor": "middle",
                                       class: "tick"}, fmt(t, xt[1] - xt[0])));
      }
      svg.appendChild(svgEl("text", {x: W - m.r, y: H - 4, "text-anchor": "end", class: "tick"},
                            xlabel));
      let i = 0, lx = m.l + 8;
      for (const [name, pts] of this.series) {
        const color = PALETTE[i++ % PALETTE.length];
        const dots = (this.opts.dots || []).includes(name);   // a scatter: no line
        const attrs = {points: pts.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
                       fill: "none", stroke: dots ? "none" : color, "stroke-width": 1.6,
                       "data-series": name, "data-points": pts.length};
        svg.appendChild(svgEl("polyline", attrs));
        if (dots || pts.length < 3) {
          for (const p of pts) svg.appendChild(svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: dots ? 3.5 : 2.5,
                                                                 fill: color, "data-series": name}));
        }
        if (this.series.size > 1) {
          svg.appendChild(svgEl("rect", {x: lx, y: m.t + 2, width: 10, height: 3, fill: color}));
          svg.appendChild(svgEl("text", {x: lx + 13, y: m.t + 7, class: "legend"}, name));
          lx += 18 + 6.5 * name.length;
        }
      }
    }
    this.el.replaceChildren(svg);
  }
}

function barChart(container, items, unit) {
  // items: [[label, value], ...] drawn as horizontal bars
  const W = 560, row = 22, m = {l: 110, r: 80};
  const H = row * items.length + 10;
  const max = Math.max(...items.map(i => i[1]), 1e-9);
  const svg = svgEl("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "bars"});
  items.forEach(([label, value], k) => {
    const y = 5 + k * row, w = (W - m.l - m.r) * value / max;
    svg.appendChild(svgEl("text", {x: m.l - 6, y: y + 14, "text-anchor": "end", class: "tick"}, label));
    svg.appendChild(svgEl("rect", {x: m.l, y: y + 3, width: Math.max(w, 0.5), height: row - 7,
                                   fill: PALETTE[k % PALETTE.length], "data-label": label}));
    svg.appendChild(svgEl("text", {x: m.l + w + 5, y: y + 14, class: "tick"}, fmt(value) + (unit || "")));
  });
  container.replaceChildren(svg);
}
