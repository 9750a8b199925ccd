// A run's steps as a graph, drawn as SVG: columns by depth (a step stands right of every step it needs, an
// instance of a for_each right of its step), each box with the step's state, node, attempt number and fence, and
// what happened before (a retry, or a move off a lost node).

import { nodeHash, stateClass, svg } from './dom.js';

const BOX_W = 260;
const BOX_H = 78;
const GAP_X = 60;
const GAP_Y = 18;
const MARGIN = 12;

function predecessors(step, ids) {
  const out = step.needs.filter((id) => ids.has(id));
  if (step.parent && ids.has(step.parent)) out.push(step.parent);
  return out;
}

export function layout(steps) {
  const byId = new Map(steps.map((s) => [s.id, s]));
  const ids = new Set(byId.keys());
  const depth = new Map();
  const visiting = new Set();
  const depthOf = (id) => {
    if (depth.has(id)) return depth.get(id);
    if (visiting.has(id)) return 0; // a cycle cannot pass validation; drawn flat rather than looping
    visiting.add(id);
    const preds = predecessors(byId.get(id), ids);
    const d = preds.length ? 1 + Math.max(...preds.map(depthOf)) : 0;
    visiting.delete(id);
    depth.set(id, d);
    return d;
  };
  const columns = [];
  for (const step of steps) {
    const d = depthOf(step.id);
    (columns[d] = columns[d] || []).push(step);
  }
  const place = new Map();
  columns.forEach((column, d) => column.forEach((step, i) => {
    place.set(step.id, { x: MARGIN + d * (BOX_W + GAP_X), y: MARGIN + i * (BOX_H + GAP_Y) });
  }));
  const width = MARGIN * 2 + Math.max(1, columns.length) * (BOX_W + GAP_X) - GAP_X;
  const height = MARGIN * 2 + Math.max(1, ...columns.map((c) => (c || []).length)) * (BOX_H + GAP_Y) - GAP_Y;
  return { place, width, height, ids };
}

// What the box says about the attempts before the current one: the hub's reason for the last one that ended.
function previously(step) {
  const attempts = step.attempts;
  if (attempts.length < 2) return '';
  const before = attempts[attempts.length - 2];
  const current = attempts[attempts.length - 1];
  if (before.state === 'lost') {
    return before.node !== current.node ? `moved from ${before.node} (${before.reason || 'lost'})`
      : `placed again after: ${before.reason || 'lost'}`;
  }
  return `retry ${attempts.length - 1}: before ${before.state}${before.reason ? `, ${before.reason}` : ''}`;
}

function clip(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

export function drawRun(run) {
  const steps = run.steps || [];
  const { place, width, height, ids } = layout(steps);
  const edges = [];
  for (const step of steps) {
    const to = place.get(step.id);
    for (const id of predecessors(step, ids)) {
      const from = place.get(id);
      const x1 = from.x + BOX_W;
      const y1 = from.y + BOX_H / 2;
      const x2 = to.x;
      const y2 = to.y + BOX_H / 2;
      edges.push(svg('path', { class: 'edge', d: `M${x1},${y1} C${x1 + GAP_X / 2},${y1} ${x2 - GAP_X / 2},${y2} ${x2},${y2}` }));
    }
  }
  const boxes = steps.map((step) => {
    const { x, y } = place.get(step.id);
    const current = step.attempts[step.attempts.length - 1];
    const where = current
      ? `${current.node} · attempt ${step.attempts.length} · fence ${current.fence}`
      : (step.waiting ? clip(`waiting: ${step.waiting}`, 40) : 'no attempt yet');
    const before = previously(step);
    const node = svg('g', { class: `step ${stateClass(step.state)}`, 'data-step': step.id, transform: `translate(${x},${y})` },
      svg('title', { text: [step.id, step.state, where, before, step.error || ''].filter(Boolean).join('\n') }),
      svg('rect', { width: BOX_W, height: BOX_H, rx: 6 }),
      svg('text', { x: 10, y: 18, class: 'step-id', text: clip(step.id, 30) }),
      svg('text', { x: BOX_W - 10, y: 18, class: 'step-state end', text: step.state }),
      svg('text', { x: 10, y: 38, class: 'step-where', 'data-node': current ? current.node : '', text: clip(where, 44) }),
      svg('text', { x: 10, y: 56, class: 'step-before', text: clip(before, 46) }),
      svg('text', { x: 10, y: 72, class: 'step-kind', text: clip(`${step.kind}${step.uses ? ` · ${step.uses}` : ''}${step.migratable ? ' · migratable' : ''}`, 40) }));
    if (current) {
      const a = svg('a', { href: nodeHash(current.node) }, node);
      return a;
    }
    return node;
  });
  return svg('svg', { class: 'dag', viewBox: `0 0 ${width} ${height}`, width, height, role: 'img', 'aria-label': `steps of run ${run.id}` },
    svg('defs', {}), edges, boxes);
}
