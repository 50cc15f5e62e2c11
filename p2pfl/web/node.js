// The node page: polls this node's /status and /history and redraws every section.
"use strict";

const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);

function text(id, value) {
  $(id).textContent = value;
}

function tag(id, value) {
  $(id).textContent = value;
  $(id).className = "tag " + value;
}

// public if any address is; else relayed if we hold a relay slot; else the first kind.
function reachability(reach) {
  const kinds = Object.values(reach.addrs || {});
  if (kinds.includes("public")) return "public";
  if ((reach.relays || []).length) return "relayed";
  return kinds.find((k) => k !== "unknown") || "unknown";
}

function renderIdentity(s) {
  text("peer-id", s.peer_id);
  const reach = s.reachability || {};
  tag("reach", reachability(reach));
  $("addrs").replaceChildren(...(s.addrs || []).map((addr) =>
    el("div", {}, `${addr} (${(reach.addrs || {})[addr] || "unknown"})`)));
  text("relays", (reach.relays || []).map(short).join(", ") || "none");
  const relay = s.relay;
  text("relay-service", relay
    ? `${relay.circuits_open} circuits open, ${relay.bytes_relayed} bytes relayed` : "off");
  text("version", s.version || "–");
  text("task", `${s.task}, ${s.aggregator}, ${s.compression}`);
  const m = s.membership;
  text("network", m && m.network_id ? m.network_id : m ? `allowlist (${m.members_known})` : "open");
  text("cert", m && m.cert_not_after
    ? "expires " + new Date(m.cert_not_after * 1000).toISOString().slice(0, 16) : "–");
  text("uptime", `${fmt(s.uptime_s / 60, 1)} min`);
}

function renderLearning(s, history) {
  text("round", s.round);
  text("accuracy", fmt(s.accuracy, 4));
  text("loss", fmt(s.train_loss, 4));
  tag("state", s.state);
  text("epsilon", s.epsilon === null ? "off"
    : `${fmt(s.epsilon, 3)} / ${s.dp_target_epsilon ?? "∞"}`);
  const rounds = history.rounds;
  const byRound = [
    { name: "accuracy", colour: COLOURS[0], points: rounds.map((r) => [r.round, r.accuracy]) },
    { name: "train loss", colour: COLOURS[1], points: rounds.map((r) => [r.round, r.train_loss]) },
  ];
  if (s.epsilon !== null) {
    byRound.push({ name: "ε", colour: COLOURS[3], points: rounds.map((r) => [r.round, r.epsilon]) });
  }
  lineChart($("accuracy-by-round"), byRound, { xLabel: "round", yMin: 0 });
  legend($("accuracy-legend"), byRound);
  const samples = history.samples;
  const byTime = [
    { name: "accuracy", colour: COLOURS[0], points: samples.map((p) => [p.t, p.accuracy]) },
    { name: "train loss", colour: COLOURS[1], points: samples.map((p) => [p.t, p.train_loss]) },
  ];
  lineChart($("accuracy-by-time"), byTime, { xLabel: "s", yMin: 0 });
  legend($("time-legend"), byTime);
  const phases = ["train_s", "merge_s", "prepare_s", "evaluate_s", "checkpoint_s", "other_s"];
  const byPhase = phases.map((name, i) => ({
    name: name.replace("_s", ""), colour: COLOURS[i],
    points: rounds.map((r) => [r.round, r.phases[name] ?? null]),
  }));
  lineChart($("phases-chart"), byPhase, { xLabel: "round (s per phase)", yMin: 0 });
  legend($("phases-legend"), byPhase);
}

function renderGraph(s) {
  const inPeers = Object.keys(s.in_peers || {});
  const ids = new Set([...s.peer_book, ...s.neighbours, ...inPeers]);
  ids.delete(s.peer_id);
  const nodes = [{ id: s.peer_id, label: "this node", colour: COLOURS[0], ring: 0 }];
  for (const id of ids) {
    const linked = s.neighbours.includes(id) || inPeers.includes(id);
    nodes.push({ id, label: short(id), colour: linked ? COLOURS[2] : "#98a2b3", ring: 1 });
  }
  const edges = [
    ...s.neighbours.map((id) => ({ from: s.peer_id, to: id, colour: COLOURS[0] })),
    ...inPeers.map((id) => ({ from: id, to: s.peer_id, colour: COLOURS[1] })),
  ];
  peerGraph($("graph"), nodes, edges);
  text("book-count", `${s.known_peers} in the peer book, ${s.peers_unreachable} unreachable`);
}

// Increase of a cumulative count between consecutive samples (a restart reads as 0).
function rate(samples, value) {
  return samples.slice(1).map((p, i) => [p.t, Math.max(0, value(p) - value(samples[i]))]);
}

function renderHealth(s, history) {
  const total = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);
  text("push-failures", total(s.send_failures));
  text("conn-refused", total(s.connections_refused));
  text("accepted", s.updates_accepted);
  text("rejected", total(s.updates_rejected));
  // Peers that took a share without accepting it get weight-0 probes (PROTOCOL.md §4).
  const silence = s.silence || { silent: 0, dropped: 0 };
  text("silent", `${silence.silent} (${silence.dropped})`);
  // Merges that went on without every live in-neighbour (p2pfl/pacing.py).
  text("waited-out", s.mix_waited_out ?? 0);
  const samples = history.samples;
  const reasons = [...new Set(samples.flatMap((p) => Object.keys(p.rejected)))].sort();
  const series = reasons.map((reason, i) => ({
    name: reason, colour: COLOURS[i % COLOURS.length],
    points: rate(samples, (p) => p.rejected[reason] || 0),
  }));
  series.push({ name: "push failures", colour: "#344054",
                points: rate(samples, (p) => p.push_failures) });
  series.push({ name: "connections refused", colour: "#98a2b3",
                points: rate(samples, (p) => p.connections_refused) });
  lineChart($("rejections-chart"), series, { xLabel: "s (per sample)", yMin: 0 });
  legend($("rejections-legend"), series);
  const mass = [
    { name: "weight", colour: COLOURS[0], points: samples.map((p) => [p.t, p.weight]) },
    { name: "pending", colour: COLOURS[1], points: samples.map((p) => [p.t, p.weight_pending]) },
    { name: "in flight", colour: COLOURS[2],
      points: samples.map((p) => [p.t, p.weight_in_flight]) },
  ];
  lineChart($("mass-chart"), mass, { xLabel: "s", yMin: 0 });
  legend($("mass-legend"), mass);
}

function renderNeighbours(s) {
  const inPeers = s.in_peers || {};
  const reach = s.reachability || {};
  const ids = [...new Set([...s.neighbours, ...Object.keys(inPeers)])].sort();
  const rows = ids.map((id) => {
    const heard = inPeers[id] || { accepted: 0, refused: {}, last_heard_s_ago: null };
    const refused = Object.entries(heard.refused).map(([r, n]) => `${r} ${n}`).join(", ");
    const path = (reach.relayed_peers || {})[id] ? "relayed via " + short(reach.relayed_peers[id])
      : (reach.direct_peers || []).includes(id) ? "direct" : "not connected";
    const mbit = (s.link_mbit || {});
    const link = `${(mbit.push || {})[id] ?? "ok"} / ${(mbit.read || {})[id] ?? "ok"}`;
    const row = el("tr");
    row.append(
      el("td", { class: "mono", title: id }, short(id)),
      el("td", {}, s.neighbours.includes(id) ? "yes" : ""),
      el("td", {}, id in inPeers ? "yes" : ""),
      el("td", {}, path), el("td", {}, link), el("td", {}, ago(heard.last_heard_s_ago)),
      el("td", {}, heard.accepted), el("td", {}, refused || "–"),
      el("td", {}, fmt((s.held_shares || {})[id] ?? null, 4)),
      el("td", {}, (s.send_failures || {})[id] || 0));
    return row;
  });
  $("neighbours").replaceChildren(...rows);
}

async function poll() {
  const [status, history] = await Promise.all([getJson("status"), getJson("history")]);
  if (status === null) {
    text("updated", "the node does not answer");
    $("updated").className = "sub error";
    return;
  }
  const past = history || { samples: [], rounds: [] };
  renderIdentity(status);
  renderLearning(status, past);
  renderGraph(status);
  renderHealth(status, past);
  renderNeighbours(status);
  text("updated", "updated " + new Date().toLocaleTimeString());
  $("updated").className = "sub";
  document.body.dataset.round = status.round;  // tests wait for this
}

poll();
setInterval(poll, POLL_MS);
