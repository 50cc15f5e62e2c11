// The network page: polls the launcher's /network (every node's latest /status and its
// accuracy over time) and draws the nodes side by side, one chart, and the gossip graph.
"use strict";

const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);
const colour = (index) => COLOURS[index % COLOURS.length];

function card(node) {
  const s = node.status;
  const box = el("div", { class: "node", id: `node-${node.index}` });
  const title = el("div");
  title.append(el("b", {}, `node ${node.index} `), el("span", { class: "mono" }, short(node.peer_id)));
  title.firstChild.style.color = colour(node.index);
  box.append(title);
  if (!s) {
    box.append(el("span", { class: "tag down" }, node.running ? "starting" : "stopped"));
    return box;
  }
  const rejected = Object.values(s.updates_rejected).reduce((a, b) => a + b, 0);
  const rows = [
    ["round", s.round], ["accuracy", fmt(s.accuracy, 4)], ["state", s.state],
    ["neighbours", s.neighbours.length], ["accepted", s.updates_accepted],
    ["rejected", rejected], ["weight", fmt(s.weight, 1)],
  ];
  const list = el("dl");
  for (const [name, value] of rows) {
    list.append(el("dt", {}, name), el("dd", { class: `node-${name}` }, value));
  }
  box.append(list);
  if (node.page) box.append(el("a", { href: node.page }, "node page"));
  return box;
}

function render(data) {
  const nodes = data.nodes;
  const live = nodes.filter((n) => n.status);
  const accuracies = live.map((n) => n.status.accuracy).filter((a) => a !== null);
  $("summary").textContent = `${live.length} of ${nodes.length} nodes answering` +
    (accuracies.length ? `, mean accuracy ${fmt(accuracies.reduce((a, b) => a + b, 0)
      / accuracies.length, 4)}` : "");
  $("nodes").replaceChildren(...nodes.map(card));
  const series = nodes.map((n) => ({ name: `node ${n.index}`, colour: colour(n.index),
                                     points: n.accuracy }));
  lineChart($("accuracy-chart"), series, { xLabel: "s", yMin: 0, yMax: 1 });
  legend($("accuracy-legend"), series);
  const byId = new Set(nodes.map((n) => n.peer_id));
  const graphNodes = nodes.filter((n) => n.peer_id).map((n) => ({
    id: n.peer_id, label: `${n.index}`, colour: n.status ? colour(n.index) : "#98a2b3", ring: 1,
  }));
  const edges = live.flatMap((n) => n.status.neighbours.filter((p) => byId.has(p))
    .map((p) => ({ from: n.peer_id, to: p, colour: "#98a2b3" })));
  peerGraph($("graph"), graphNodes, edges);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()} (run time ${data.t} s)`;
  document.body.dataset.nodes = live.length;  // tests wait for this
}

async function poll() {
  const data = await getJson("network");
  if (data === null) {
    $("updated").textContent = "the launcher does not answer (the run may have ended)";
    $("updated").className = "sub error";
    return;
  }
  $("updated").className = "sub";
  render(data);
}

poll();
setInterval(poll, POLL_MS);
