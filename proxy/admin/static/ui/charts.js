// SVG charts for the console, built with createElementNS: every label is a text node, never
// markup, and no style attribute is written (the page's CSP allows none).
"use strict";

window.Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = [
    "#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4",
    "#ec4899", "#84cc16", "#f97316", "#64748b", "#14b8a6", "#a855f7",
  ];

  function svg(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      node.setAttribute(name, String(value));
    }
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function color(index) {
    return PALETTE[index % PALETTE.length];
  }

  // A horizontal gauge: settled spend against the limit, a red block line and amber alert
  // marks at their thresholds. The scale reaches past 100 % when a threshold or the spend does.
  function gauge(pct, thresholds, status) {
    const width = 400, height = 50, top = 16, bar = 18;
    const marks = thresholds.map((t) => Number(t.pct)).filter((p) => Number.isFinite(p));
    const scale = Math.max(100, pct || 0, ...marks) * 1.05;
    const x = (p) => Math.max(0, Math.min(width, (p / scale) * width));
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      class: "gauge-svg",
      role: "img",
    });
    root.append(svg("title", {}, `${formatPct(pct)} of the limit`));
    root.append(svg("rect", { x: 0, y: top, width, height: bar, rx: 4, class: "gauge-track" }));
    const fill = svg("rect", {
      x: 0, y: top, width: x(pct || 0), height: bar, rx: 4,
      class: status === "blocked" ? "gauge-fill blocked" : "gauge-fill",
    });
    fill.dataset.pct = String(pct);
    root.append(fill);
    root.append(svg("line", { x1: x(100), x2: x(100), y1: top - 6, y2: top + bar + 6, class: "gauge-limit" }));
    for (const t of thresholds) {
      const p = Number(t.pct);
      if (!Number.isFinite(p)) continue;
      const cls = t.action === "block" ? "gauge-block" : "gauge-alert";
      root.append(svg("line", { x1: x(p), x2: x(p), y1: top - 8, y2: top + bar + 8, class: cls }));
      root.append(svg("text", { x: x(p), y: top - 9, class: `gauge-mark-label ${cls}`, "text-anchor": "middle" }, `${p}%`));
    }
    return root;
  }

  function formatPct(pct) {
    return `${Number(pct || 0).toFixed(2)} %`;
  }

  // Stacked bars: one bar per day, one segment per series. `days` is a list of labels;
  // `series` a list of {label, values[]} (values in major units, one per day).
  function stacked(days, series, unit) {
    const width = 1000, height = 320, left = 70, bottom = 40, top = 16, right = 10;
    const totals = days.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
    const max = Math.max(...totals, 0) || 1;
    const plotH = height - top - bottom;
    const step = (width - left - right) / Math.max(days.length, 1);
    const barW = Math.max(2, step * 0.7);
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart-svg", role: "img" });
    root.append(svg("title", {}, `Cost per day${unit ? " (" + unit + ")" : ""}`));
    root.append(svg("text", { x: 4, y: top - 4, class: "axis axis-unit" }, `cost per day${unit ? " (" + unit + ")" : ""}`));
    for (let g = 0; g <= 4; g++) {
      const value = (max * g) / 4;
      const y = top + plotH - (plotH * g) / 4;
      root.append(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
      root.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, shortNumber(value)));
    }
    days.forEach((day, i) => {
      let y = top + plotH;
      const x = left + i * step + (step - barW) / 2;
      series.forEach((s, k) => {
        const v = s.values[i] || 0;
        if (v <= 0) return;
        const h = (v / max) * plotH;
        y -= h;
        const rect = svg("rect", { x, y, width: barW, height: Math.max(h, 0.5), fill: color(k), class: "segment" });
        rect.append(svg("title", {}, `${day} · ${s.label}: ${v}`));
        root.append(rect);
      });
      const every = Math.ceil(days.length / 12);
      if (i % every === 0) {
        root.append(svg("text", { x: x + barW / 2, y: height - bottom + 18, "text-anchor": "middle", class: "axis" }, day.slice(5)));
      }
    });
    return root;
  }

  function shortNumber(value) {
    if (value === 0) return "0";
    if (value >= 1000) return value.toFixed(0);
    if (value >= 1) return value.toFixed(2);
    return value.toPrecision(2);
  }

  return { gauge, stacked, color, formatPct };
})();
