// Small drawing helpers shared by the node page and the network page: a line chart
// and a peer graph in plain SVG, so the page needs no library and no build step.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLOURS = ["#2e5aac", "#d4622a", "#12805c", "#9e3fb0", "#b42318", "#0e7c86",
                 "#8a6d00", "#5b5f97", "#c23b80", "#4d7c0f"];

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function short(peerId) {
  return peerId ? "…" + peerId.slice(-8) : "?";
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? Number(value.toFixed(digits)).toString() : String(value);
}

// Axis labels stay short: 103.488 would not fit beside the axis.
function tick(value) {
  return Math.abs(value) >= 100 ? value.toFixed(0) : Number(value.toPrecision(3)).toString();
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return seconds.toFixed(0) + " s ago";
  return (seconds / 60).toFixed(1) + " min ago";
}

// series: [{name, colour, points: [[x, y], ...]}]; draws axes with min/max labels.
function lineChart(svg, series, { xLabel = "", yMin = null, yMax = null } = {}) {
  const width = svg.clientWidth || 400, height = svg.clientHeight || 180;
  const pad = { left: 44, right: 8, top: 8, bottom: 22 };
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const points = series.flatMap((s) => s.points.filter((p) => p[1] !== null));
  if (points.length === 0) {
    svg.append(el("svg:text", { x: width / 2, y: height / 2, "text-anchor": "middle" },
                  "no data yet"));
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let y0 = yMin ?? Math.min(...ys), y1 = yMax ?? Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const sx = (x) => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - (y - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
  const axis = { stroke: "#d0d5dd", "stroke-width": 1 };
  svg.append(
    el("svg:line", { x1: pad.left, y1: sy(y0), x2: width - pad.right, y2: sy(y0), ...axis }),
    el("svg:line", { x1: pad.left, y1: sy(y0), x2: pad.left, y2: sy(y1), ...axis }),
    el("svg:text", { x: pad.left - 4, y: sy(y1) + 8, "text-anchor": "end" }, tick(y1)),
    el("svg:text", { x: pad.left - 4, y: sy(y0), "text-anchor": "end" }, tick(y0)),
    el("svg:text", { x: pad.left, y: height - 6 }, tick(x0)),
    el("svg:text", { x: width - pad.right, y: height - 6, "text-anchor": "end" },
       `${tick(x1)} ${xLabel}`));
  for (const s of series) {
    const path = s.points.filter((p) => p[1] !== null)
      .map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    if (path) {
      svg.append(el("svg:path", { d: path, fill: "none", stroke: s.colour, "stroke-width": 2 }));
    }
  }
}

function legend(container, series) {
  container.replaceChildren(...series.map((s) => {
    const item = el("span", {}, "■ " + s.name);
    item.style.color = s.colour;
    return item;
  }));
}

// nodes: [{id, label, colour, ring}] (ring 0 is the centre); edges: [{from, to, colour}].
function peerGraph(svg, nodes, edges) {
  const width = svg.clientWidth || 400, height = svg.clientHeight || 260;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const cx = width / 2, cy = height / 2, radius = Math.min(width, height) / 2 - 24;
  const rings = {};
  for (const node of nodes) (rings[node.ring] ??= []).push(node);
  const at = {};
  for (const [ring, members] of Object.entries(rings)) {
    const r = Number(ring) === 0 && members.length === 1 ? 0
      : radius * (Number(ring) + 1) / (Math.max(...Object.keys(rings).map(Number)) + 1);
    members.forEach((node, i) => {
      const angle = 2 * Math.PI * i / members.length - Math.PI / 2;
      at[node.id] = [cx + r * Math.cos(angle), cy + r * Math.sin(angle)];
    });
  }
  const marker = el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 17, refY: 5,
    markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" });
  marker.append(el("svg:path", { d: "M0,0L10,5L0,10z", fill: "#98a2b3" }));
  const defs = el("svg:defs");
  defs.append(marker);
  svg.append(defs);
  for (const edge of edges) {
    const [a, b] = [at[edge.from], at[edge.to]];
    if (!a || !b) continue;
    svg.append(el("svg:line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1],
      stroke: edge.colour || "#98a2b3", "stroke-width": 1.5, "marker-end": "url(#arrow)" }));
  }
  for (const node of nodes) {
    const [x, y] = at[node.id];
    const circle = el("svg:circle", { cx: x, cy: y, r: node.ring === 0 ? 9 : 6,
      fill: node.colour || "#98a2b3", stroke: "#fff", "stroke-width": 1.5 });
    circle.append(el("svg:title", {}, node.id));
    svg.append(circle, el("svg:text", { x, y: y - 10, "text-anchor": "middle" }, node.label));
  }
}

// Fetch JSON from this page's own server; null (and an error shown) if it does not answer.
async function getJson(path) {
  try {
    const response = await fetch(path, { cache: "no-store" });
    return response.ok ? await response.json() : null;
  } catch (error) {
    return null;
  }
}
